"""Atomic file writes shared by the trainer, the model files and the evaluator's cache, and the
lock that keeps two jobs out of one output folder."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil

import torch

__all__ = [
    "atomic_save",
    "atomic_write_text",
    "output_lock",
    "OutputBusy",
    "DiskFull",
    "is_disk_full",
    "disk_full_exit",
    "temp_path",
]

# Less free space than this after a failed write means the write failed for want of space: torch.save
# reports a full disk as "unexpected pos ..." (a RuntimeError), not as ENOSPC.
_FULL_BELOW = 64 * 1024


EXIT_DISK_FULL = 5  # the exit status of mosx train / eval / demo when the disk fills


class DiskFull(OSError):
    """A write failed because the file system holding it is full: ENOSPC / EDQUOT, or any error of
    the writer while under 64 KiB are left free (torch.save reports a full disk that way). A quota
    reached with space left on the device is recognised only when the writer raises EDQUOT. The
    file it was replacing is untouched."""


def is_disk_full(e: BaseException) -> bool:
    """Whether an error is a full file system: an OSError (DiskFull included) with ENOSPC / EDQUOT."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_exit(command: str, e: OSError, advice: str) -> int:
    """What mosx train / eval / demo do when the disk fills: the error and what to rerun on stderr,
    no traceback; returns EXIT_DISK_FULL. Any other OSError is raised again."""
    import sys

    if not is_disk_full(e):
        raise e
    print(f"{command}: {e}\n{advice}", file=sys.stderr)
    return EXIT_DISK_FULL


def _free_bytes(folder: str):
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def atomic_write_text(text: str, path: str) -> None:
    """A text file (UTF-8) written as atomic_save writes: the old file or the new one, never a part."""
    atomic_save(text, path, writer=lambda obj, f: f.write(obj.encode("utf-8")))


def atomic_save(obj, path: str, writer=None) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a reader (or a run
    killed mid-write) sees the old file or the new one, never a partial one. writer(obj, file): another
    serialiser than torch.save."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            (writer or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        free = _free_bytes(folder)  # measured before the partial file is removed
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, Exception) and (is_disk_full(e) or (free is not None and free < _FULL_BELOW)):
            raise DiskFull(
                errno.ENOSPC,
                f"no space left on the device holding {folder} while writing {os.path.basename(path)} "
                f"({type(e).__name__}: {e}); the previous {os.path.basename(path)}, if any, is untouched",
            ) from e
        raise
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class OutputBusy(RuntimeError):
    """Another live process holds the output folder's lock."""


LOCK_NAME = ".mosx.lock"


def _lock_holder(path: str):
    """(pid, host) written in a lock file, or None when it is unreadable or half-written."""
    try:
        with open(path, encoding="utf-8") as f:
            pid, host = f.read().split("\n")[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):  # gone, or no pid at all
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _host_tag() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def temp_path(path: str, suffix: str = "") -> str:
    """Where a writer of `path` puts the data before renaming it into place: a hidden file beside it,
    ``.<name>.mosx-tmp.<host>.<pid><suffix>``. The marker, host and pid let output_lock remove what
    a killed writer left (and nothing else); `suffix` for writers that add an extension (np.savez)."""
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{base}.mosx-tmp.{_host_tag()}.{os.getpid()}{suffix}")


_TEMPORARY = re.compile(r"^\..+\.mosx-tmp\.([A-Za-z0-9-]+)\.(\d+)(\.[A-Za-z0-9]+)?$")


def _sweep_temporaries(folder: str, me: int) -> None:
    """Remove the half-written files that a killed mosx writer (SIGKILL, power loss) left anywhere
    under folder: only names made by :func:`temp_path`, written on this host by a process that no
    longer runs. A live writer, another host's writer and every other file are left alone."""
    host = _host_tag()
    for root, _, files in os.walk(folder):
        for name in files:
            m = _TEMPORARY.match(name)
            if m and m.group(1) == host and int(m.group(2)) != me and not _alive(int(m.group(2))):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(root, name))


@contextlib.contextmanager
def output_lock(folder: str, what: str):
    """Hold `<folder>/.mosx.lock` while a job writes into folder: a second job started on the same
    folder stops with OutputBusy instead of overwriting the first one's files. A lock left by a
    process that no longer runs (on this host) is taken over; one from another host is respected.
    Half-written files a killed job left behind (:func:`temp_path` names) are removed on entry."""
    import socket

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    me = (os.getpid(), socket.gethostname())
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is not None and holder != me and (holder[1] != me[1] or _alive(holder[0])):
                raise OutputBusy(
                    f"{folder}: another {what} (pid {holder[0]} on {holder[1]}) is writing here; wait for it "
                    f"or use another output folder (if no such process runs, delete {path})"
                ) from None
            try:
                os.remove(path)  # stale (or half-written by a job that died at once): take it over
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{me[0]}\n{me[1]}\n")
        break
    else:  # pragma: no cover - three races in a row
        raise OutputBusy(f"{folder}: could not take {path}")
    try:
        _sweep_temporaries(folder, me[0])
        yield
    finally:
        if _lock_holder(path) == me:
            os.remove(path)
