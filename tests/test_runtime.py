"""mosx.runtime: one process, and two processes on gloo (CPU) that create, join and tear down the
process group and gather rank-strided rows."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mosx.runtime import Runtime, resolve_device


def test_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rt = Runtime.setup("cpu")
    assert (rt.rank, rt.world, rt.main, rt.owns_group) == (0, 1, True, False)
    assert rt.device == torch.device("cpu") and rt.collective_device == torch.device("cpu")
    assert not (rt.amp or rt.channels_last or rt.fused)
    rt.barrier()  # nothing to wait for
    a, b = np.arange(6.0).reshape(3, 2), None
    got = rt.gather_strided_rows(3, [a, b])
    assert got[0] is a and got[1] is None
    rows = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(rt.all_gather_strided_rows(3, rows), rows)
    with rt.autocast():  # amp off: float32 stays float32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    rt.close()
    assert not dist.is_initialized()


def test_flags_and_devices(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rt = Runtime.setup("cpu", amp="auto", channels_last="on", fused="off")
    assert (rt.amp, rt.channels_last, rt.fused) == (False, True, False)  # "auto" is on for CUDA only
    assert Runtime.setup("cpu", amp="bf16").amp is True
    assert Runtime.setup(torch.device("cpu"), fused=True).fused is True
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda:3")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")
    want = torch.device("cuda:3") if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == want and resolve_device(None) == want


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, result_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    rt = Runtime.setup("cpu")
    assert rt.owns_group and dist.is_initialized() and dist.get_backend() == "gloo"
    assert (rt.rank, rt.world, rt.main) == (rank, world, rank == 0)
    assert rt.collective_device == torch.device("cpu")
    joined = Runtime.setup("cpu")  # a second runtime joins the group and does not own it
    assert not joined.owns_group and (joined.rank, joined.world) == (rank, world)
    joined.close()
    assert dist.is_initialized()

    n = 7  # rank 0 holds rows 0, 2, 4, 6; rank 1 rows 1, 3, 5
    full = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    labels = np.arange(n, dtype=np.int64) * 10
    mine = list(range(rank, n, world))
    got = rt.gather_strided_rows(n, [full[mine], labels[mine], None])
    every = rt.all_gather_strided_rows(n, torch.from_numpy(full[mine]))
    # a rank with no rows (n smaller than the world) still takes part
    few = rt.all_gather_strided_rows(1, torch.ones(1, 2) if rank == 0 else None)
    rt.barrier()
    if rt.main:
        torch.save({"got": got, "every": every, "few": few}, result_file)
    else:
        assert got == [None, None, None]
        assert torch.equal(every, torch.from_numpy(full)) and torch.equal(few, torch.ones(1, 2))
    rt.close()
    assert not dist.is_initialized() and not rt.owns_group


def test_two_processes_gloo(tmp_path):
    import torch.multiprocessing as mp

    result_file = str(tmp_path / "rows.pt")
    # fork: the workers need not import torch again (one thread each)
    mp.start_processes(_worker, args=(2, _free_port(), result_file), nprocs=2, join=True, start_method="fork")
    r = torch.load(result_file, weights_only=False)
    n = 7
    full = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    np.testing.assert_array_equal(r["got"][0], full)
    np.testing.assert_array_equal(r["got"][1], np.arange(n) * 10)
    assert r["got"][0].dtype == np.float32 and r["got"][1].dtype == np.int64
    assert r["got"][2] is None
    assert torch.equal(r["every"], torch.from_numpy(full))
    assert torch.equal(r["few"], torch.ones(1, 2))


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
