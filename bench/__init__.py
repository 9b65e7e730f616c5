"""Benchmarks and long-running checks of qawatch (not tests): `make bench`, `make chaos`, `make soak`."""
