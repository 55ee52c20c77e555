"""Checkpoints on disk: save with a completeness marker, choose what to resume, prune
(``manager``); resume on another number of ranks (``reshard``)."""
