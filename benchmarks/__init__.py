"""Benchmarks of proxprop_jax (see benchmarks/RESULTS.md)."""
