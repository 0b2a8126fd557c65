"""A per-test time limit for pytest without pytest-timeout (which the GPU machine may lack).

Load it with `-p pytest_alarm` (tools/ on PYTHONPATH). MOSX_TEST_TIMEOUT (seconds, default 120)
bounds each test's setup + call + teardown: a SIGALRM then fails that test with a clear message
and the run goes on with the next one. A test stuck inside one long native call (a CUDA kernel
that never returns) is only interrupted when it returns to Python; the `timeout` around the whole
pytest invocation (tools/gpu_check.sh) is the outer bound for that.
"""

import os
import signal

import pytest

_LIMIT = int(os.environ.get("MOSX_TEST_TIMEOUT", "120"))


class TestTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise TestTimeout(f"test exceeded MOSX_TEST_TIMEOUT={_LIMIT} s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if _LIMIT <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(_LIMIT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
