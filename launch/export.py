"""Consolidate a run's checkpoint (any ZeRO stage) into one fp32 export.

    python launch/export.py runs/NAME [--tag iter_00001000] [--weights auto|ema|live]

Usage and behaviour: ``pipeline/tools/export.py``.
"""

from pipeline.tools.export import cli

if __name__ == "__main__":
    cli()
