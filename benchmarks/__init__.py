"""Benchmarks: one script per op (``python benchmarks/bench_<op>.py [--quick] [--json PATH]``)."""
