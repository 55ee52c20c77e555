"""Helpers every layer may use: rank-0 logging, host and device memory, the host-sync counter."""
