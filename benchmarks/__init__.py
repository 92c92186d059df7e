"""Benchmark scripts (not tests): each measures its subjects side by side and writes its results
under ``benchmarks/results/``; run them from the repository root as ``python -m benchmarks.NAME``."""
