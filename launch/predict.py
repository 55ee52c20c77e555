"""Run an exported detector on images: COCO-format results and one drawn PNG per image.

    python launch/predict.py runs/NAME/model_fp32.safetensors photos/ more.jpg --out predictions/

Usage and behaviour: ``pipeline/tools/predict.py``.
"""

from pipeline.tools.predict import cli

if __name__ == "__main__":
    cli()
