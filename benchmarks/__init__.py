"""Benchmark scripts: each prints a table and writes JSON, markdown and a figure."""
