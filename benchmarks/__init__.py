"""Benchmarks: each module a program that prints a throughput against a reference (docs/benchmarks.md)."""
