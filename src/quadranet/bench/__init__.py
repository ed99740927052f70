"""Measurement level: MACs, saved-activation bytes, timing and memory benchmarks."""
