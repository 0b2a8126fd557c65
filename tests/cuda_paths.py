"""The CUDA kernel path that plan_rows (csrc/cuda/launch.cuh) takes for a row layout, as the tests
expect it (docs/semantics.md): shared by tests/test_cuda.py (on a GPU) and
tests/test_cuda_emulated.py (the kernels under tools/cuda_emu on the CPU)."""

import torch

# (lanes per row, values per lane) of the register tier, narrowest first (fast_tier)
REGISTER_TIERS = ((8, 8), (16, 8), (32, 8), (32, 32), (32, 64))
BLOCK_MIN_LOGITS = 1024  # kBlockMinLogits
OFFSETS_IN_SMEM = 2048  # kOffsetsInSmem: K + 1 at most, for the block tier


def planned_path(L, K, dtype, shift=0, uniform=True, kernels="fast", block_fits=lambda: True):
    """ "register:<lanes>x<per>", "block" or "chunked" for a forward op on rows of L logits in K
    groups whose rows (and output rows) share the alignment shift `shift` when `uniform`;
    block_fits() says whether the block tier's layout fits in the device's shared memory (asked
    only when the rest of the rule allows the block tier)."""
    if kernels == "chunked":
        return "chunked"
    if uniform and K <= 32:
        for lanes, per in REGISTER_TIERS:
            if L + shift <= lanes * per and not (dtype == torch.float64 and per > 32):
                return f"register:{lanes}x{per}"
    if L >= BLOCK_MIN_LOGITS and K + 1 <= OFFSETS_IN_SMEM and block_fits():
        return "block"
    return "chunked"


def widest_block_row(smem_bytes, K, dtype, want_arg, smem):
    """The most logits a row of K groups may have for the block tier's layout to fit in `smem`
    bytes; smem_bytes is the op _cuda_block_smem_bytes of the build under test (the layout grows
    with L: bisect)."""
    lo, hi = 2 * K, smem // torch.empty(0, dtype=dtype).element_size()
    assert smem_bytes(K, hi, dtype, want_arg) > smem
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if smem_bytes(K, mid, dtype, want_arg) <= smem else (lo, mid)
    return lo
