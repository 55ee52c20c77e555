"""A/B of two commits on README command 1's training run, alternating on the same machine.

    python benchmarks/ab_commits.py OLD [NEW] [--rounds 2] [--overrides key=value ...]

Checks both commits out into temporary worktrees and runs ``launch/train.py --config
configs/shapes_default.yaml`` of each in turn (A B A B ...), each importing its own code
(``PYTHONPATH``), on one shared copy of the embedded dataset. Alternating makes drift in the
machine's speed hit both alike. Prints wall seconds, training img/s (``run_summary.json``,
start-up window left out) and AP per run, and appends the rows to benchmarks/results.jsonl.
``--overrides`` shorten the run (e.g. ``schedule.max_iters=100 train.evaluate=false``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def run_once(tree: Path, data_root: Path, out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "launch/train.py", "--config", "configs/shapes_default.yaml", f"data.root={data_root}",
           f"train.output_dir={out}", "train.run_name=ab", "tracking.wandb_mode=disabled", "train.progress=false",
           *overrides]
    env = dict(os.environ, PYTHONPATH=str(tree))
    tic = time.perf_counter()
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: exit {done.returncode}\n{done.stderr[-3000:]}")
    summary = json.loads((out / "ab/run_summary.json").read_text())
    return {"wall_s": round(wall, 1), "images_per_s": round(summary["images_per_s"], 3),
            "iterations": summary["iterations"], "AP": summary["metrics"].get("bbox/AP"),
            "AP50": summary["metrics"].get("bbox/AP50")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old")
    p.add_argument("new", nargs="?", default="HEAD")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results.jsonl")
    p.add_argument("--overrides", nargs="*", default=[], help="key=value overrides for both sides")
    args = p.parse_args()
    commits = {name: _git("rev-parse", "--short", ref) for name, ref in (("old", args.old), ("new", args.new))}
    rows = []
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        trees = {}
        for name, commit in commits.items():
            trees[name] = Path(tmp) / name
            _git("worktree", "add", "--detach", str(trees[name]), commit)
        try:
            for round_ in range(args.rounds):
                for name in ("old", "new"):
                    result = run_once(trees[name], Path(tmp) / "shapes", Path(tmp) / f"runs-{name}", args.overrides)
                    rows.append({"bench": "ab_default_run", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "device": platform.processor() or "cpu", "round": round_, "side": name,
                                 "commit": commits[name], "overrides": args.overrides, **result})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            for tree in trees.values():
                _git("worktree", "remove", "--force", str(tree))
    print(f"\n{'round':>5} {'side':>4} {'commit':>8} {'wall s':>7} {'img/s':>7} {'AP50':>7}")
    for r in rows:
        print(f"{r['round']:>5} {r['side']:>4} {r['commit']:>8} {r['wall_s']:>7.1f} {r['images_per_s']:>7.2f} "
              f"{'' if r['AP50'] is None else format(r['AP50'], '.4f'):>7}")
    with args.out.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
