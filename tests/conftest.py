import os
import zlib

import pytest
import torch

# Tests start Python child processes (`python -m mosx.cli`, `-m pytest`, `-c`, torchrun workers), which
# put their working directory first on sys.path. From the repository root that is the source tree,
# which holds no compiled mosx._C after a plain `pip install .`: the children must import the
# installed mosx, as the test process does. (Python 3.11+; under 3.10 use an editable install.)
os.environ.setdefault("PYTHONSAFEPATH", "1")

# Tests run on every device the build supports: CUDA only when a GPU is present and the CUDA
# kernels were built.
DEVICES = ["cpu"]
if torch.cuda.is_available():
    import mosx

    if mosx.cuda_built():
        DEVICES.append("cuda")

# Every test draws its own random inputs from a seed derived from its name, so tests see different
# data and a failure reproduces. MOSX_TEST_SEED=<int> shifts all seeds for fresh draws.
BASE_SEED = int(os.environ.get("MOSX_TEST_SEED", "0"))


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def gen(request):
    seed = (zlib.crc32(request.node.nodeid.encode()) + BASE_SEED) % (2**31)
    return torch.Generator().manual_seed(seed)
