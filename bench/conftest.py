import os

import torch

# Quick mode (CI): the smallest sizes only, each benchmark run once, to prove the benchmarks work.
QUICK = os.environ.get("MOSX_BENCH_QUICK", "0") == "1"


def pytest_report_header(config):
    return [f"mosx bench: torch {torch.__version__}, {torch.get_num_threads()} threads, quick={QUICK}"]
