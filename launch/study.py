"""Run, plan or report a scaling study (a grid of training runs).

    python launch/study.py studies/mini_batch_scaling.yaml            # run here, one point after another
    python launch/study.py STUDY --list                               # the points, nothing run
    python launch/study.py STUDY --plan --hostfile hosts --gpus-per-node 8   # launch_plan.sh for a cluster
    python launch/study.py STUDY --report                             # CSV, table and plots from what ran

The study file format is in pipeline/studies/spec.py, the runner in pipeline/studies/runner.py.
"""

import sys

from pipeline.studies.runner import main

if __name__ == "__main__":
    sys.exit(main())
