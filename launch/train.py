"""Train and evaluate a detector; every launcher runs this file.

    python launch/train.py --config configs/shapes_default.yaml [key=value ...]
    deepspeed --hostfile launch/hostfile.example launch/train.py --config configs/coco_r50_fpn.yaml

The command's logic, usage and exit statuses: ``pipeline/tools/train.py``.
"""

from pipeline.tools.train import cli

if __name__ == "__main__":
    cli()
