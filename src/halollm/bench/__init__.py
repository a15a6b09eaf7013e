"""Benchmarks: measured numbers written to files with the machine and the command."""
