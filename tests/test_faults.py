"""The CLI fault suite (issue 12): `mosx train` killed at random moments and resumed, and a disk that
fills during a run. Each asserts that nothing written in full is lost, that a resumed run ends with
the weights of an uninterrupted one, and that a full disk stops with a message, not a traceback."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import TINY, states_equal, subprocess_env, tiny_data

from mosx._io import EXIT_DISK_FULL, atomic_save, output_lock
from mosx.train import make_config, train

STEPS = 24


def cli_args(data, out, *, resume=False, sleep=0.05):
    """`mosx train` on the tiny recipe of test_train (checkpoint every 2 steps, log every 4)."""
    args = [sys.executable, "-m", "mosx.cli", "train", "--preset", "cpu-demo", "--model", TINY["model"]]
    args += ["--data", str(data), "--groups", "sizes:2,2", "--batch-size", "8", "--resize", "0", "--crop", "6"]
    args += ["--eval-resize", "0", "--warmup-steps", "3", "--milestones", "10", "--steps", str(STEPS)]
    args += ["--log-every", "4", "--ckpt-every", "2", "--threads", "1", "--workers", "0", "--progress", "off"]
    args += ["--amp", "off", "--seed", "3", "--out", str(out), "--step-sleep", str(sleep)]
    return args + (["--resume"] if resume else [])


def reference_run(tmp_path, gen):
    x, y = tiny_data(gen)
    data = tmp_path / "d.pt"
    torch.save({"x": x, "y": y}, data)
    cfg = make_config("cpu-demo", **{**TINY, "steps": STEPS, "ckpt_every": 2, "groups": "sizes:2,2", "data": str(data)})
    train(cfg.replace(out=str(tmp_path / "ref")))
    return data, torch.load(tmp_path / "ref" / "model.pt", weights_only=True)["state_dict"]


def checkpoint_step(path):
    return torch.load(path, weights_only=True)["step"]


def assert_complete(out, want_state):
    """The run in `out` finished with the reference weights, logged every step once, left no
    half-written file and no lock."""
    got = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert states_equal(want_state, got)
    assert checkpoint_step(out / "checkpoint.pt") == STEPS
    logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(4, STEPS + 1, 4))  # nothing twice, nothing missing
    assert sorted(n for n in os.listdir(out) if n.startswith(".")) == []


@pytest.mark.slow
def test_kill_at_random_moments_then_resume_is_bit_identical(tmp_path, gen):
    """Three SIGKILLs at random moments (seeded from the test's seed), mid-step or mid-write alike;
    after each one `--resume` picks up from the last checkpoint written in full."""
    data, want = reference_run(tmp_path, gen)
    out = tmp_path / "killed"
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    ck = out / "checkpoint.pt"
    kills, last = 0, 0
    for attempt in range(6):
        if kills == 3:
            break
        proc = subprocess.Popen(
            cli_args(data, out, resume=ck.exists()),
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:  # wait for a checkpoint past the last one
            if ck.exists() and checkpoint_step(ck) > last:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))  # then a random moment: inside a step, a checkpoint or the log
        if proc.poll() is not None:  # finished before the kill came
            assert proc.returncode == 0, proc.communicate()[0].decode()[-3000:]
            break
        proc.send_signal(signal.SIGKILL)
        log = proc.communicate()[0].decode()
        assert proc.returncode == -signal.SIGKILL, log[-3000:]
        kills += 1
        step = checkpoint_step(ck)  # always loadable: the old file or the new one, never a part
        assert last <= step < STEPS or step == STEPS
        last = step
    if not (out / "model.pt").exists():
        r = subprocess.run(
            cli_args(data, out, resume=True, sleep=0), env=subprocess_env(), capture_output=True, timeout=300
        )
        assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()[-3000:]
    assert kills >= 1, "no kill landed before the run finished"
    assert_complete(out, want)


def test_a_killed_write_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    """SIGKILL during a write leaves its temporary (`temp_path`); the next job to take the folder's
    lock removes it, in subfolders too (the evaluator's, inside a demo run), and leaves alone a live
    writer's, another host's, a pid that cannot exist as ours, and every file that is not a mosx
    temporary."""
    from mosx._io import _host_tag, temp_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "eval_flat" / "cache").mkdir(parents=True)
    host = _host_tag()
    stale = [
        tmp_path / f".checkpoint.pt.mosx-tmp.{host}.{dead.pid}",
        tmp_path / "eval_flat" / "cache" / f".logits.npy.mosx-tmp.{host}.{dead.pid}.npy",
        tmp_path / f".meta.json.mosx-tmp.{host}.99999999999999999999",  # no such pid: not alive
    ]
    kept = [
        tmp_path / f".model.pt.mosx-tmp.{host}.{os.getppid()}",  # the pytest runner's parent is alive
        tmp_path / f".model.pt.mosx-tmp.otherhost.{dead.pid}",  # another host's writer
        tmp_path / f"draft.tmp{dead.pid}.docx",  # a user's file that merely looks temporary
        tmp_path / f".notes.tmp{dead.pid}",
    ]
    for f in stale + kept:
        f.write_bytes(b"x")
    assert os.path.basename(temp_path(tmp_path / "a.pt")).startswith(".a.pt.mosx-tmp.")
    with output_lock(str(tmp_path), "test"):
        assert [f.name for f in stale if f.exists()] == []
        assert [f.name for f in kept if not f.exists()] == []


def _temporaries(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".mosx-tmp." in p.name)


@pytest.mark.slow
def test_demo_killed_at_random_moments_then_reused_ends_as_an_uninterrupted_run(tmp_path, gen):
    """The smoke demo, killed twice at random moments and rerun with --reuse: it finishes with the
    metrics of an uninterrupted run of the same seed, and no half-written file is left anywhere."""
    from test_demo import FONTS_INSTALLED, SMOKE

    if not FONTS_INSTALLED:
        pytest.skip("Noto fonts not installed")
    data = str(tmp_path / "data")
    demo = [sys.executable, "-m", "mosx.cli", "demo", *SMOKE, "--data-root", data]
    t0 = time.time()
    r = subprocess.run([*demo, "--out", str(tmp_path / "ref")], env=subprocess_env(), capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    span = time.time() - t0  # the data are cached now: later runs are shorter
    rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
    out = tmp_path / "killed"
    for _ in range(2):
        proc = subprocess.Popen([*demo, "--out", str(out), "--reuse"], env=subprocess_env(), stdout=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, max(0.6, 0.7 * span)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = subprocess.run([*demo, "--out", str(out), "--reuse"], env=subprocess_env(), capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    want = json.loads((tmp_path / "ref" / "demo_results.json").read_text())
    got = json.loads((out / "demo_results.json").read_text())
    assert got["methods"].keys() == want["methods"].keys() and got["id_accuracy"] == want["id_accuracy"]
    for label, m in want["methods"].items():  # every metric; the timings differ
        assert (got["methods"][label]["sets"], got["methods"][label]["average"]) == (m["sets"], m["average"]), label
    assert _temporaries(out) == [] and not (out / ".mosx.lock").exists()


def _mount_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few hundred KiB (root only: skipped elsewhere); remount(size) resizes it."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64k"):
        pytest.skip("cannot mount a tmpfs here")

    def remount(size):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    try:
        yield disk, remount
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_atomic_save_on_a_full_disk_names_it_and_keeps_the_old_file(small_disk):
    disk, _ = small_disk
    atomic_save({"w": torch.zeros(1000)}, str(disk / "ck.pt"))
    with pytest.raises(OSError, match="no space left on the device holding .* while writing ck.pt") as e:
        atomic_save({"w": torch.zeros(100_000)}, str(disk / "ck.pt"))
    assert e.value.errno == 28
    assert torch.load(disk / "ck.pt", weights_only=True)["w"].shape == (1000,)
    assert os.listdir(disk) == ["ck.pt"]


def test_train_on_a_disk_that_fills_stops_clearly_and_resumes(tmp_path, gen, small_disk):
    """The disk holds one checkpoint but not the next one beside it (atomic writes need both at
    once): `mosx train` exits with EXIT_DISK_FULL and a message, the last checkpoint loads, nothing
    half-written is left; with room again, --resume ends with the uninterrupted run's weights."""
    disk, remount = small_disk
    data, want = reference_run(tmp_path, gen)
    probe = tmp_path / "probe"
    r = subprocess.run(cli_args(data, probe, sleep=0), env=subprocess_env(), capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    ck_size = (probe / "checkpoint.pt").stat().st_size
    # room for the small files and one checkpoint, not for a second one beside it
    remount(f"{(ck_size * 3 // 2) // 4096 * 4096 + 4096}")
    out = disk / "run"
    r = subprocess.run(cli_args(data, out, sleep=0), env=subprocess_env(), capture_output=True, timeout=300)
    err = r.stderr.decode()
    assert r.returncode == EXIT_DISK_FULL, err[-3000:]
    assert "no space left on" in err.lower() and "--resume" in err and "Traceback" not in err
    step = checkpoint_step(out / "checkpoint.pt")
    assert 0 < step < STEPS
    assert not (out / "model.pt").exists()
    assert sorted(n for n in os.listdir(out) if n.startswith(".")) == []  # no temporary, no lock
    remount("16m")
    r = subprocess.run(
        cli_args(data, out, resume=True, sleep=0), env=subprocess_env(), capture_output=True, timeout=300
    )
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert_complete(out, want)


def test_eval_on_a_full_disk_exits_5_with_a_message(tmp_path, small_disk, capsys):
    """`mosx eval` whose output (and cache) folder fills: exit 5, the message names the file and
    says what to rerun, no traceback, and no temporary left on the disk."""
    import numpy as np
    from test_evaluate import SIZE, _png, net

    from mosx import evaluate as E

    disk, remount = small_disk
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "eel"):
        os.makedirs(tmp_path / "id" / c)
        for i in range(4):
            _png(tmp_path / "id" / c / f"{i}.png", (200, 40, 40), rng)
    os.makedirs(tmp_path / "far")
    for i in range(4):
        _png(tmp_path / "far" / f"{i}.png", (128, 128, 128), rng)
    torch.save(net(), tmp_path / "model.pt")
    remount("8k")  # two pages: the cache's arrays and meta.json do not fit
    args = ["--model", str(tmp_path / "model.pt"), "--id", str(tmp_path / "id"), "--ood", f"far={tmp_path / 'far'}"]
    args += ["--out", str(disk / "out"), "--image-size", str(SIZE), "--workers", "0", "--device", "cpu"]
    args += ["--no-progress", "--no-plots", "--batch-size", "4", "--trust-pickle"]
    assert E.main(args) == EXIT_DISK_FULL
    err = capsys.readouterr().err
    assert "no space left on" in err.lower() and "rerun the same command" in err
    assert _temporaries(disk) == []
    remount("16m")  # with room again the same command completes
    assert E.main(args) == 0


def test_a_resumed_log_keeps_its_lines_even_if_killed_at_once(tmp_path):
    """Found by the random-kill test: a resumed run truncated log.jsonl and wrote the kept lines
    through a buffer, so a kill before its first logged step lost them. Now they are on disk when the
    log opens; a torn last line (a kill mid-write, always past the checkpoint) is dropped."""
    from types import SimpleNamespace

    from mosx.train.log import TrainLog
    from mosx.train.state import Progress

    lines = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 0.1, "images_per_s": 1.0}) for s in (4, 8, 12)]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 16, "lo')  # torn at the end
    cfg = SimpleNamespace(out=str(tmp_path), progress=False, steps=24)
    run = SimpleNamespace(cfg=cfg, rt=SimpleNamespace(main=True, device=torch.device("cpu")))
    log = TrainLog(run, Progress(start_step=8))
    try:  # read from disk before anything else is written: as if this process were killed now
        assert (tmp_path / "log.jsonl").read_text().splitlines() == lines[:2]
    finally:
        log.file.close()
