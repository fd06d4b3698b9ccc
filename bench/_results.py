"""Kept for bench scripts: the bookkeeping lives in :mod:`keepbits.benchmarking`."""
from keepbits.benchmarking import default_data_dir, machine, results_dir, write_result

__all__ = ["default_data_dir", "machine", "results_dir", "write_result"]
