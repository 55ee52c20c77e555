"""Run, plan or report a scaling study (a grid of training runs).

    python launch/study.py studies/mini_batch_scaling.yaml            # run here, one point after another
    python launch/study.py STUDY --plan --hostfile hosts --gpus-per-node 8   # launch_plan.sh for a cluster
    python launch/study.py STUDY --report                             # CSV, table and plots from what ran

Usage and the study file format: ``pipeline/studies/runner.py``, ``pipeline/studies/spec.py``.
"""

from pipeline.studies.runner import cli

if __name__ == "__main__":
    cli()
