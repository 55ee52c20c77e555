"""Plots from run directories (AGVM's Phi and mu per module).

    python launch/plots.py agvm runs/NAME [runs/OTHER ...] [--out FILE]

Usage and behaviour: ``pipeline/tools/plots.py``.
"""

from pipeline.tools.plots import cli

if __name__ == "__main__":
    cli()
