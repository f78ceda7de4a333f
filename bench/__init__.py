"""Benchmarks of the farm against a bare pipeline; ``make bench`` runs them all.

Run each one from the repository root as a module (``python -m bench.farm_overhead``); with
``--write`` it replaces its own section of docs/BENCHMARKS.md.
"""
