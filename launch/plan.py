"""Memory planner: per-rank memory of a run before it is launched, and the largest micro-batch.

    python launch/plan.py --config configs/shapes_default.yaml --world-size 8

Usage and behaviour: ``pipeline/tools/planner.py``.
"""

from pipeline.tools.planner import cli

if __name__ == "__main__":
    cli()
