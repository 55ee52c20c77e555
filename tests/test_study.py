"""Scaling studies: grid expansion, the cluster plan, and real runs through launch/study.py
(deepspeed launcher subprocesses): results, resume, a failing point reported and not lost."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import yaml

import pipeline.studies.runner as study_cli  # launch/study.py's logic
from conftest import REPO, tiny_overrides
from pipeline.errors import ConfigError
from pipeline.studies.spec import load_study, read_status
from pipeline.train.tracking import read_metrics


def _write(tmp_path, spec: dict):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_grid_expands_as_declared(tmp_path):
    spec = {"name": "s", "precision": "fp32", "fixed": {"schedule.epochs": 2},
            "grid": {"batch": ["2x4", "1x8x2"], "optimizer": ["sgd", "agvm_sgd"], "zero": [0, 3],
                     "schedule.warmup_iters": [0, 50],
                     "bn": {"frozen": {"model.norm": "frozen"}, "cgbn2": {"model.norm": "cgbn", "model.bn_group": 2}}}}
    study = load_study(_write(tmp_path, spec), tmp_path / "out")
    assert len(study.points) == 2 * 2 * 2 * 2 * 2
    names = [p.name for p in study.points]
    assert len(set(names)) == len(names)
    by_name = {p.name: p for p in study.points}
    p = by_name["1x8x2__agvm_sgd__zero3__warmup_iters50__cgbn2"]
    assert p.ranks == 1
    assert p.overrides == {"schedule.epochs": 2, "train.micro_batch": 8, "train.grad_accum": 2,
                           "optim.name": "agvm_sgd", "train.ds_config": "ds_configs/zero3_fp32.json",
                           "schedule.warmup_iters": 50, "model.norm": "cgbn", "model.bn_group": 2}
    assert by_name["2x4__sgd__zero0__warmup_iters0__frozen"].ranks == 2
    assert study.run_dir(p) == tmp_path / "out/s/1x8x2__agvm_sgd__zero3__warmup_iters50__cgbn2"


@pytest.mark.parametrize("grid, words", [
    ({"batch": ["2x"]}, ["grid.batch", "RANKSxMICRO"]),
    ({"colour": ["red"]}, ["unknown axis", "colour"]),
    ({"zero": [7]}, ["zero7_fp32.json", "does not exist"]),
    ({"optimizer": ["adam_typo"]}, ["optim.name"]),  # every point's config is validated up front
])
def test_bad_study_names_the_axis(tmp_path, grid, words):
    path = _write(tmp_path, {"name": "s", "grid": grid})
    with pytest.raises(ConfigError) as err:
        load_study(path)
    for word in words:
        assert word in str(err.value)


def test_cluster_plan_has_one_command_per_point(tmp_path):
    spec = {"name": "big", "grid": {"batch": ["8x2", "16x2", "64x2"]}}
    study = load_study(_write(tmp_path, spec), tmp_path / "out")
    plan = study_cli.write_plan(study, REPO / "launch/hostfile.example", gpus_per_node=8)
    commands = [ln for ln in plan.read_text().splitlines() if ln.startswith("deepspeed ")]
    assert len(commands) == 3
    assert "--num_nodes 1 --num_gpus 8 " in commands[0]
    assert "--num_nodes 2 --num_gpus 8 " in commands[1]
    assert "--num_nodes 8 --num_gpus 8 " in commands[2]
    assert all("tracking.group=big" in c and "train.run_name=" in c for c in commands)
    bad = load_study(_write(tmp_path, {"name": "b", "grid": {"batch": ["12x2"]}}), tmp_path / "out")
    with pytest.raises(ConfigError, match="whole nodes"):
        study_cli.write_plan(bad, REPO / "launch/hostfile.example", gpus_per_node=8)


def test_the_cluster_plan_carries_each_points_predicted_hours(tmp_path, capsys):
    """--plan predicts every point with the step-time model: a comment before each command and a table
    with hours and GPU-hours (= hours x GPUs); the same epochs on 8x the GPUs at 8x the batch take fewer
    hours and no fewer GPU-hours."""
    from test_step_time import TINY

    fixed = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in TINY)}
    fixed.update({"data.root": str(tmp_path / "not_written"), "data.synthetic_train": 4096,
                  "schedule.policy": "multistep", "schedule.epochs": 2})
    path = _write(tmp_path, {"name": "big", "fixed": fixed, "grid": {"batch": ["8x2", "64x2"]}})
    assert study_cli.main([str(path), "--output-dir", str(tmp_path / "out"), "--plan", "--gpu", "a100",
                           "--inter-node", "200Gb", "--intra-node", "nvlink3"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("8x2 ", "64x2 "))}
    (g8, h8, gh8), (g64, h64, gh64) = [[float(rows[p][i].replace(",", "")) for i in (1, 5, 6)] for p in ("8x2", "64x2")]
    assert (g8, g64) == (8, 64) and h64 < h8 and gh64 >= gh8 * 0.99
    assert gh8 == pytest.approx(h8 * 8, rel=0.02) and gh64 == pytest.approx(h64 * 64, rel=0.02)
    plan = (tmp_path / "out/big/launch_plan.sh").read_text().splitlines()
    for name in ("8x2", "64x2"):
        comment = next(i for i, line in enumerate(plan) if line.startswith(f"# {name}: predicted "))
        assert plan[comment + 1].startswith("deepspeed ") and f"train.run_name={name}" in plan[comment + 1]


def _tiny_fixed(shapes_root, tmp_path) -> dict:
    fixed = {}
    for item in tiny_overrides(shapes_root, tmp_path, "faster_rcnn"):
        key, value = item.split("=", 1)
        if not key.startswith("train.output_dir") and not key.startswith("train.run_name"):
            fixed[key] = yaml.safe_load(value)
    fixed["train.evaluate"] = True
    fixed["agvm.start_after_warmup"] = 0  # 4 iterations: AGVM's points estimate from the end of warmup on
    return fixed


def test_two_point_study_runs_resumes_and_reports(shapes_root, tmp_path):
    """Two real points (plain SGD, AGVM-SGD with micro-batch halves): CSV, table, plots; a second
    invocation runs nothing again."""
    fixed = _tiny_fixed(shapes_root, tmp_path)
    spec = {"name": "tiny", "fixed": fixed,
            "grid": {"batch": ["1x2x2"], "optimizer": ["sgd", "agvm_sgd"]}}
    path = _write(tmp_path, spec)
    out = tmp_path / "runs"
    assert study_cli.main([str(path), "--output-dir", str(out)]) == 0
    root = out / "tiny"
    rows = list(csv.DictReader((root / "results.csv").open()))
    assert [r["point"] for r in rows] == ["1x2x2__sgd", "1x2x2__agvm_sgd"]
    for row in rows:
        assert row["status"] == "done" and row["iterations"] == "4" and row["global_batch"] == "4"
        run_dir = root / row["point"]
        evaluated = json.loads((run_dir / "eval_metrics.json").read_text())
        assert float(row["AP50"]) == evaluated["bbox/AP50"] and float(row["AP"]) == evaluated["bbox/AP"]
        # Throughput from the per-window log records (one iteration of 4 images each, the first
        # window holds start-up costs and is left out): total images / total seconds.
        windows = [r["train/images_per_s"] for r in read_metrics(run_dir) if "train/images_per_s" in r][1:]
        assert len(windows) == 3
        assert float(row["images_per_s"]) == pytest.approx(4 * len(windows) / sum(4 / ips for ips in windows),
                                                           rel=1e-9)
        assert 0.1 < float(row["peak_mem_gib"]) < 24  # a resident set: more than torch alone, less than the machine
    assert "mu_final/backbone" in rows[1] and rows[1]["mu_final/backbone"]
    for name in ("results.md", "ap_vs_batch.png", "time_vs_batch.png", "agvm_phi_mu.png"):
        assert (root / name).is_file(), name
    assert "| 1x2x2__agvm_sgd |" in (root / "results.md").read_text()
    run_cfg = yaml.safe_load((root / "1x2x2__sgd/config.yaml").read_text())
    assert run_cfg["tracking"]["group"] == "tiny"  # every point is a W&B run in the study's group
    logs = {p.name: (root / f"{p.name}.log").read_text().count("### ") for p in load_study(path, out).points}
    assert study_cli.main([str(path), "--output-dir", str(out)]) == 0  # resume: both finished
    again = {p.name: (root / f"{p.name}.log").read_text().count("### ") for p in load_study(path, out).points}
    assert again == logs == {"1x2x2__sgd": 1, "1x2x2__agvm_sgd": 1}


def test_bad_point_stops_the_study_before_anything_runs(shapes_root, tmp_path):
    """Validation of every point for its launch shape comes first: a missing dataset, or AGVM on one
    rank without accumulation, fail the study with exit status 2, naming the point and the key,
    before the healthy point has started."""
    fixed = _tiny_fixed(shapes_root, tmp_path)
    spec = {"name": "bad", "fixed": fixed,
            "grid": {"case": {"ok": {"data.root": str(shapes_root)},
                              "missing": {"data.root": str(tmp_path / "no_such_dataset")},
                              "one_half": {"optim.name": "agvm_sgd", "train.grad_accum": 1}}}}
    path = _write(tmp_path, spec)
    out = tmp_path / "runs"
    with pytest.raises(ConfigError) as err:
        study_cli.validate_points(load_study(path, out))
    message = str(err.value)
    assert "2 of 3 points cannot run" in message
    assert "point missing" in message and "data.train_ann" in message and "no_such_dataset" in message
    assert "point one_half" in message and "train.grad_accum >= 2" in message and "point ok" not in message
    assert study_cli.main([str(path), "--output-dir", str(out)]) == 2
    assert not (out / "bad").exists(), "nothing may start when a point is invalid"


def test_failing_point_is_retried_once_then_reported(shapes_root, tmp_path):
    """A point that crashes (DeepSpeed refuses its engine settings) is retried from its checkpoint,
    marked failed, kept in the results, and the study exits non-zero; a point whose data turn out
    bad (exit status 2) is not retried; the healthy point still runs, and a point whose loss turns
    NaN is a result (diverged), not a crash: it is not retried."""
    broken = tmp_path / "broken_data"
    (broken / "annotations").mkdir(parents=True)
    for part in ("train", "val"):
        (broken / part).symlink_to(shapes_root / part)
    (broken / "annotations/instances_train.json").write_text('{"images": [')  # truncated: not JSON
    (broken / "annotations/instances_val.json").write_text((shapes_root / "annotations/instances_val.json").read_text())
    crashing = tmp_path / "stage7.json"
    crashing.write_text('{"zero_optimization": {"stage": 7}}')
    fixed = _tiny_fixed(shapes_root, tmp_path)
    spec = {"name": "flaky", "fixed": fixed,
            "grid": {"data": {"ok": {"data.root": str(shapes_root)},
                              "crash": {"train.ds_config": str(crashing)},
                              "bad_data": {"data.root": str(broken)},
                              "diverges": {"optim.base_lr": 1.0e6, "schedule.warmup_iters": 0}}}}
    path = _write(tmp_path, spec)
    out = tmp_path / "runs"
    assert study_cli.main([str(path), "--output-dir", str(out)]) == 1
    study = load_study(path, out)
    status = read_status(study)
    assert status["ok"]["status"] == "done" and status["ok"]["attempts"] == 1
    assert status["crash"]["status"] == "failed" and status["crash"]["attempts"] == 2
    log = (study.root / "crash.log").read_text()
    assert log.count("### ") == 2 and "train.resume=auto" in log.split("### ")[2]
    assert status["bad_data"]["status"] == "failed" and status["bad_data"]["attempts"] == 1
    assert status["bad_data"]["returncode"] == 2
    assert "instances_train.json is not valid JSON" in (study.root / "bad_data.log").read_text()
    assert status["diverges"]["status"] == "diverged" and status["diverges"]["attempts"] == 1
    rows = {r["point"]: r for r in csv.DictReader((study.root / "results.csv").open())}
    assert rows["crash"]["status"] == "failed" and rows["ok"]["status"] == "done"
    assert rows["diverges"]["diverged"] == "True" and rows["diverges"]["AP50"] == ""
    # Failed points stay failed on a plain re-run (no silent retries), and run again when asked.
    assert study_cli.main([str(path), "--output-dir", str(out)]) == 1
    assert json.loads((study.root / "study_status.json").read_text())["crash"]["attempts"] == 2


def test_a_point_left_running_by_a_killed_runner_is_retried_and_resumes(tmp_path, monkeypatch):
    """The runner killed during a point's second attempt left attempts=2, status=running: the next
    runner counts it as a crash and retries it; a retry (--retry-failed too) resumes when a complete
    checkpoint exists instead of starting from scratch."""
    from pipeline.studies.spec import write_status

    spec = {"name": "killed", "fixed": {"schedule.max_iters": 2}, "grid": {"lr": {"a": {"optim.base_lr": 0.01},
                                                                                  "b": {"optim.base_lr": 0.02}}}}
    study = load_study(_write(tmp_path, spec), tmp_path / "runs")
    write_status(study, {"a": {"status": "running", "attempts": 2}, "b": {"status": "failed", "attempts": 2}})
    for name in ("a", "b"):  # each left a complete checkpoint
        (study.run_dir(next(p for p in study.points if p.name == name)) / "checkpoints/iter_00000001").mkdir(
            parents=True)
        (study.root / name / "checkpoints/iter_00000001/complete.json").write_text("{}")
    calls = []

    def fake_run_point(study_, point, resume):
        calls.append((point.name, resume))
        summary = {"iterations": 2, "total_iterations": 2, "diverged": False, "metrics": {"bbox/AP": 0.1}}
        (study_.run_dir(point) / "run_summary.json").write_text(json.dumps(summary))
        return 0, 1.0

    monkeypatch.setattr(study_cli, "run_point", fake_run_point)
    assert study_cli.run_study(study) == ["b"]  # b failed before: not retried unasked
    assert calls == [("a", True)]
    assert read_status(study)["a"]["status"] == "done"
    assert study_cli.run_study(study, retry_failed=True) == []
    assert calls == [("a", True), ("b", True)]  # resumed from its checkpoint, not from scratch


def test_model_size_study_labels_measured_and_estimated_cells(shapes_root, tmp_path, monkeypatch):
    """Two cells (ZeRO 0 and 3): the one that fits is measured by a real 3-step run; with the
    budget forced below its estimate, the other is only estimated; both reach the CSV and plot."""
    import pipeline.studies.model_size as model_size

    fixed = _tiny_fixed(shapes_root, tmp_path)
    spec = {"name": "sizes", "mode": "model_size", "fixed": fixed, "grid": {"zero": [0, 3]}}
    path = _write(tmp_path, spec)
    out = tmp_path / "runs"
    real_budget = model_size.machine_budget
    study = load_study(path, out)
    cells = {}
    for point, budget in zip(study.points, (real_budget, lambda ranks: 0.0)):  # no room for ZeRO-3
        monkeypatch.setattr(model_size, "machine_budget", budget)
        cells[point.name] = model_size.measure_cell(study, point)
    assert cells["zero0"]["label"] == "measured" and cells["zero0"]["measured_gib"] > 0
    assert cells["zero3"]["label"] == "estimated" and "measured_gib" not in cells["zero3"]
    assert cells["zero0"]["parameters"] == cells["zero3"]["parameters"] > 0
    for name, cell in cells.items():
        (study.root / name).mkdir(parents=True)
        (study.root / name / "cell.json").write_text(json.dumps(cell))
    written = model_size.report_model_size(study)
    rows = list(csv.DictReader(written["csv"].open()))
    assert [r["label"] for r in rows] == ["measured", "estimated"]
    assert written["memory_vs_parameters"].is_file()


def test_seeds_of_a_point_merge_into_mean_std_and_n(tmp_path):
    """Three seeds x two recipes, from finished run directories: results.csv has one row per recipe with
    the mean and sample standard deviation over its finished seeds (numpy, computed here), a diverged
    seed is counted and left out of the mean, runs.csv keeps every run, the plot has error bars."""
    import numpy as np

    from pipeline.studies.spec import write_status

    spec = {"name": "seeds", "fixed": {"schedule.epochs": 1},
            "grid": {"batch": ["1x8"], "recipe": {"sgd": {"optim.name": "sgd"}, "agvm": {"optim.name": "agvm_sgd",
                                                                                          "train.grad_accum": 2}},
                     "seed": [0, 1, 2]}}
    study = load_study(_write(tmp_path, spec), tmp_path / "runs")
    assert [p.overrides["train.seed"] for p in study.points[:3]] == [0, 1, 2]
    ap50 = {"1x8__sgd": [0.50, 0.56, 0.47], "1x8__agvm": [0.61, 0.58, None]}  # None: that seed diverged
    status = {}
    for p in study.points:
        recipe, seed = "__".join(p.name.split("__")[:2]), int(p.labels["seed"][4:])
        value = ap50[recipe][seed]
        run = study.run_dir(p)
        run.mkdir(parents=True)
        (run / "run_summary.json").write_text(json.dumps({
            "metrics": {"bbox/AP50": value, "bbox/AP": value and value / 2}, "global_batch": 8,
            "diverged": value is None, "iterations": 10, "total_iterations": 10, "train_seconds": 60 + seed,
            "images_per_s": 1.0 + seed, "peak_mem_gib": 1.0}))
        status[p.name] = {"status": "diverged" if value is None else "done", "attempts": 1, "wall_s": 100.0 + seed}
    write_status(study, status)
    out = study_cli.report(study)
    rows = {r["point"]: r for r in csv.DictReader(out["csv"].open())}
    assert set(rows) == {"1x8__sgd", "1x8__agvm"}
    sgd, agvm = rows["1x8__sgd"], rows["1x8__agvm"]
    assert float(sgd["AP50"]) == pytest.approx(np.mean([0.50, 0.56, 0.47]))
    assert float(sgd["AP50_std"]) == pytest.approx(np.std([0.50, 0.56, 0.47], ddof=1))
    assert (sgd["n"], sgd["diverged"], sgd["seeds"]) == ("3", "0", "seed0,seed1,seed2")
    assert float(agvm["AP50"]) == pytest.approx(0.595) and float(agvm["AP50_std"]) == pytest.approx(np.std([0.61, 0.58], ddof=1))
    assert (agvm["n"], agvm["diverged"], agvm["status"]) == ("2", "1", "2/3 done")
    assert len(list(csv.DictReader(out["runs_csv"].open()))) == 6
    assert "| 1x8__agvm |" in out["md"].read_text() and "AP50_std" in out["md"].read_text()
    assert out["ap_vs_batch"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fake_runs(study, ap50: dict) -> None:
    """Finished run directories with the given AP50 per point name (None: that run diverged)."""
    from pipeline.studies.spec import write_status

    status = {}
    for p in study.points:
        value = ap50[p.name]
        run = study.run_dir(p)
        run.mkdir(parents=True)
        (run / "run_summary.json").write_text(json.dumps({
            "metrics": {"bbox/AP50": value, "bbox/AP": value and value / 2}, "diverged": value is None,
            "global_batch": int(p.labels["batch"][2:]), "iterations": 10, "total_iterations": 10,
            "train_seconds": 60, "images_per_s": 1.0, "peak_mem_gib": 1.0}))
        status[p.name] = {"status": "diverged" if value is None else "done", "attempts": 1, "wall_s": 100.0}
        if value is not None and p.overrides["optim.name"] == "agvm_sgd":  # AGVM records of one module
            records = [{"iteration": i, "agvm/phi/backbone": value + d, "agvm/mu/backbone": 1.0}
                       for i, d in ((10, 0.3), (20, 0.0), (30, 0.1))]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_status(study, status)


def test_paired_differences_pair_the_runs_of_one_seed(tmp_path):
    """compare: the difference of AP50 between two recipes in the same seed, per batch: mean and sample
    std over the seeds where both finished (numpy on the arrays, here), the sign count, a diverged seed
    left out of its pair only; in results.md, paired.csv and a plot; AGVM's median Phi merged and plotted."""
    import numpy as np

    spec = {"name": "paired", "fixed": {"schedule.epochs": 1},
            "grid": {"seed": [0, 1, 2], "batch": ["1x8", "1x16"],
                     "recipe": {"sgd": {"optim.name": "sgd"}, "agvm": {"optim.name": "agvm_sgd", "train.grad_accum": 2},
                                "mu1": {"optim.name": "agvm_sgd", "train.grad_accum": 2, "agvm.ratio_min": 1.0,
                                        "agvm.ratio_max": 1.0}}},
            "compare": {"axis": "recipe", "pairs": [["agvm", "mu1"], ["agvm", "sgd"]]}}
    study = load_study(_write(tmp_path, spec), tmp_path / "runs")
    ap50 = {"1x8": {"sgd": [0.50, 0.56, 0.47], "agvm": [0.52, 0.60, 0.46], "mu1": [0.51, 0.57, 0.49]},
            "1x16": {"sgd": [0.30, None, 0.35], "agvm": [0.33, 0.31, 0.40], "mu1": [0.30, 0.30, 0.36]}}
    _fake_runs(study, {f"seed{s}__{b}__{r}": v[s] for b, recipes in ap50.items() for r, v in recipes.items()
                       for s in range(3)})
    out = study_cli.report(study)
    rows = {(r["batch"], r["pair"]): r for r in csv.DictReader(out["paired_csv"].open())}
    assert set(rows) == {(b, p) for b in ("1x8", "1x16") for p in ("agvm - mu1", "agvm - sgd")}
    for batch in ("1x8", "1x16"):
        agvm, mu1 = np.array(ap50[batch]["agvm"]), np.array(ap50[batch]["mu1"])
        row = rows[(batch, "agvm - mu1")]
        assert float(row["AP50_diff"]) == pytest.approx(np.mean(agvm - mu1))
        assert float(row["AP50_diff_std"]) == pytest.approx(np.std(agvm - mu1, ddof=1))
        assert row["n"] == "3" and row["higher"] == f"{int(np.sum(agvm > mu1))}/3"
    sgd_pair = rows[("1x16", "agvm - sgd")]  # seed 1's sgd diverged: that seed has no difference
    assert sgd_pair["n"] == "2" and sgd_pair["per_seed"] == "+0.030 +0.050"
    assert float(sgd_pair["AP50_diff"]) == pytest.approx(0.04)
    assert float(sgd_pair["AP50_diff_std"]) == pytest.approx(np.std([0.03, 0.05], ddof=1))
    md = out["md"].read_text()
    assert "## Paired differences of AP50 (same seed)" in md and "| 1x16 | agvm - sgd | 2 | 0.040 |" in md
    assert out["paired_vs_batch"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    merged = {r["point"]: r for r in csv.DictReader(out["csv"].open())}  # Phi: the median of each run, merged
    medians = [np.median([v + 0.3, v, v + 0.1]) for v in ap50["1x16"]["agvm"]]
    assert float(merged["1x16__agvm"]["phi_median/backbone"]) == pytest.approx(np.mean(medians))
    assert float(merged["1x16__agvm"]["phi_median/backbone_std"]) == pytest.approx(np.std(medians, ddof=1))
    assert out["phi_vs_batch"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("compare, words", [
    ({"axis": "recipe", "pairs": [["agvm", "adam"]]}, ["pair [agvm, adam]", "['adam']", "['sgd', 'agvm']"]),
    ({"axis": "colour", "pairs": [["agvm", "sgd"]]}, ["axis 'colour'", "['seed', 'recipe']"]),
    ({"axis": "seed", "pairs": [["seed0", "seed1"]]}, ["not a non-seed grid axis"]),
    ({"axis": "recipe", "pairs": [["agvm", "sgd"]], "metric": "AP75"}, ["metric 'AP75'"]),
    ({"axis": "recipe", "pairs": ["agvm", "sgd"]}, ["compare takes {axis"]),
])
def test_bad_comparison_names_the_label_and_the_fix(tmp_path, compare, words):
    spec = {"name": "s", "grid": {"seed": [0, 1], "recipe": {"sgd": {"optim.name": "sgd"},
                                                             "agvm": {"optim.name": "agvm_sgd"}}},
            "compare": compare}
    with pytest.raises(ConfigError) as err:
        load_study(_write(tmp_path, spec))
    for word in words:
        assert word in str(err.value), err.value


def test_paired_differences_need_a_seed_axis(tmp_path):
    spec = {"name": "s", "grid": {"recipe": {"sgd": {"optim.name": "sgd"}, "agvm": {"optim.name": "agvm_sgd"}}},
            "compare": {"axis": "recipe", "pairs": [["agvm", "sgd"]]}}
    with pytest.raises(ConfigError, match="add a seed axis"):
        load_study(_write(tmp_path, spec))


def test_archived_results_report_and_resume_like_the_study_itself(tmp_path):
    """Finished points archived without their checkpoints and copied into a fresh study directory
    (another machine) give the same results.csv, count as finished, and leave unfinished points out."""
    from pipeline.studies.spec import point_result, write_status

    spec = {"name": "kept", "fixed": {"schedule.epochs": 1}, "grid": {"batch": ["1x8", "1x16"], "seed": [0, 1]}}
    path = _write(tmp_path, spec)
    study = load_study(path, tmp_path / "runs")
    status = {}
    for i, p in enumerate(study.points[:3]):  # the fourth point never ran
        run = study.run_dir(p)
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints/big.pt").write_bytes(b"0" * 1000)
        (run / "run_summary.json").write_text(json.dumps({
            "metrics": {"bbox/AP50": 0.5 + i / 10, "bbox/AP": 0.2 + i / 10}, "global_batch": 8, "diverged": False,
            "iterations": 10, "total_iterations": 10 if i < 2 else 20, "train_seconds": 60, "images_per_s": 2.0,
            "peak_mem_gib": 1.0}))  # the third stopped half-way: not finished
        (run / "metrics.jsonl").write_text(json.dumps({"iteration": 10, "train/loss": 1.0 + i}) + "\n")
        status[p.name] = {"status": "done" if i < 2 else "running", "attempts": 1, "wall_s": 100.0 + i}
    write_status(study, status)
    archive_dir = tmp_path / "archive"
    assert study_cli.main([str(path), "--output-dir", str(tmp_path / "runs"), "--archive", str(archive_dir)]) == 0
    assert sorted(f.name for f in archive_dir.iterdir()) == sorted([p.name for p in study.points[:2]] +
                                                                   ["study_status.json"])
    assert not list(archive_dir.rglob("*.pt"))
    elsewhere = load_study(path, tmp_path / "elsewhere")
    shutil.copytree(archive_dir, elsewhere.root)
    assert [point_result(elsewhere.run_dir(p)) for p in elsewhere.points] == ["done", "done", None, None]
    rows = lambda s: [{k: v for k, v in r.items()} for r in csv.DictReader(study_cli.report(s)["runs_csv"].open())]  # noqa: E731
    finished = [r for r in rows(study) if r["status"] == "done"]
    assert [r for r in rows(elsewhere) if r["status"] == "done"] == finished and len(finished) == 2


def test_a_torn_run_summary_counts_as_unfinished(tmp_path):
    from pipeline.studies.spec import point_result

    (tmp_path / "run_summary.json").write_text('{"iterations": 2, "dive')
    assert point_result(tmp_path) is None
