"""Optimisation: param groups and optimizers (``optimizers``), MegDet's learning-rate rule
(``schedule``), AGVM's per-module modulation (``agvm``) and the weight EMA (``ema``)."""
