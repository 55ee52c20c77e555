"""Write the embedded synthetic COCO-format shapes dataset (training writes it when missing).

    python launch/make_dataset.py --out data/shapes --train 512 --val 128 --seed 0

Usage and behaviour: ``pipeline/data/synthetic.py``.
"""

from pipeline.data.synthetic import cli

if __name__ == "__main__":
    cli()
