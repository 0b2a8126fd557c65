"""`mosx info`: what this build of mosx is."""

from __future__ import annotations

import argparse
import platform


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="mosx info", description=__doc__).parse_args(argv)
    import torch

    import mosx

    print(f"mosx {mosx.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"CUDA kernels built: {mosx.cuda_built()}")
    print(f"GPU available: {torch.cuda.is_available()}")
    print(f"CPU: {platform.machine()}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    print(f"mosx CPU kernels: {torch.ops.mosx._cpu_kernels()} (MOSX_CPU_KERNELS=baseline forces the portable ones)")
    return 0
