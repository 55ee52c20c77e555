"""The run directory's records survive a kill or a full disk, and a retry does not mix two runs' logs.

A full disk is made real with ``RLIMIT_FSIZE`` in a child process (writes beyond the limit fail
with EFBIG, as they would with ENOSPC); a kill mid-append is a torn last line of ``metrics.jsonl``."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from pipeline.errors import DataError
from pipeline.train.tracking import read_metrics, start_metrics_afresh, truncate_metrics

RECORDS = [{"iteration": i, "train/loss": 1.0 / i} for i in range(1, 41)]


def _write_log(run_dir: Path, records: list[dict], torn: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn)
    return path


def _with_file_size_limit(limit: int, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a child whose files cannot grow beyond ``limit`` bytes (a full disk)."""
    prelude = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_a_full_disk_during_the_resume_rewrite_keeps_the_history(tmp_path):
    path = _write_log(tmp_path, RECORDS)
    before = path.read_text()
    done = _with_file_size_limit(200, f"""
        from pipeline.train.tracking import truncate_metrics
        truncate_metrics(__import__("pathlib").Path({str(tmp_path)!r}), after=30)
    """)
    assert done.returncode != 0 and "File too large" in done.stderr, done.stderr[-2000:]
    assert path.read_text() == before, "the metrics history was lost to a failed rewrite"
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"], "a temporary file was left behind"


def test_a_full_disk_while_writing_the_run_summary_keeps_the_old_one(tmp_path):
    summary = tmp_path / "run_summary.json"
    summary.write_text(json.dumps({"iterations": 10, "diverged": False, "metrics": {}}))
    before = summary.read_text()
    done = _with_file_size_limit(len(before) + 10, f"""
        from pipeline.utils.files import write_json
        write_json(__import__("pathlib").Path({str(summary)!r}), {{"iterations": 20, "padding": "x" * 5000}})
    """)
    assert done.returncode != 0 and "File too large" in done.stderr, done.stderr[-2000:]
    assert summary.read_text() == before


def test_the_trainer_writes_its_json_files_atomically():
    """Every JSON file the trainer and the study runner rewrite goes through ``write_json`` (a study
    runner reads run_summary.json on every start: a torn one would stop it)."""
    for module in ("pipeline/train/trainer.py", "pipeline/tools/evaluate.py", "pipeline/studies/runner.py"):
        source = (REPO / module).read_text()
        assert ".write_text(json.dumps" not in source, f"{module} writes JSON in place"


def test_a_torn_last_line_is_dropped_with_a_warning_naming_the_file(tmp_path, caplog):
    path = _write_log(tmp_path, RECORDS, torn='{"iteration": 41, "train/lo')
    with caplog.at_level(logging.WARNING, logger="pipeline.train.tracking"):
        assert read_metrics(tmp_path) == RECORDS
    assert any(str(path) in r.getMessage() and "torn" in r.getMessage() for r in caplog.records)
    truncate_metrics(tmp_path, after=30)
    assert read_metrics(tmp_path) == RECORDS[:30]
    assert path.read_text().endswith("\n")


def test_a_damaged_line_inside_the_log_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_log(tmp_path, RECORDS[:2])
    path.write_text(path.read_text() + "not json\n" + json.dumps(RECORDS[2]) + "\n")
    with pytest.raises(DataError, match=f"{path}:3: not a JSON record"):
        read_metrics(tmp_path)


def test_a_retry_before_the_first_checkpoint_starts_the_log_afresh(tmp_path):
    """``train.resume=true`` and no checkpoint yet (an attempt that crashed before its first save):
    the earlier attempt's records are moved aside, not appended to."""
    _write_log(tmp_path, RECORDS[:12])
    (tmp_path / "run_summary.json").write_text("{}")
    moved = start_metrics_afresh(tmp_path)
    assert read_metrics(tmp_path) == []
    assert moved and [json.loads(ln) for ln in moved.read_text().splitlines()] == RECORDS[:12]
    assert not (tmp_path / "run_summary.json").exists()
    assert start_metrics_afresh(tmp_path) is None  # nothing to move
