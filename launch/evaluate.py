"""COCO metrics of a run's checkpoint or of an fp32 export.

    python launch/evaluate.py runs/NAME
    python launch/evaluate.py --export runs/NAME/model_fp32.safetensors

Usage and behaviour: ``pipeline/tools/evaluate.py``.
"""

from pipeline.tools.evaluate import cli

if __name__ == "__main__":
    cli()
