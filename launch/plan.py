"""Memory planner: per-rank memory of a run before it is launched, and the largest micro-batch; with
``--comm`` the bytes each rank sends per step; with ``--nodes`` the step time on a cluster.

    python launch/plan.py --config configs/shapes_default.yaml --world-size 8
    python launch/plan.py --config configs/coco_r50_fpn.yaml --nodes 16 --gpu h100 --inter-node 400Gb --batch 1024

Usage and behaviour: ``pipeline/tools/planner.py``.
"""

from pipeline.tools.planner import cli

if __name__ == "__main__":
    cli()
