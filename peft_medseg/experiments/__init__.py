"""Experiments over the library: the paper's protocol and its report, and cost probes for the benchmarks."""
