"""Run identity on disk: an exclusive lock on a run directory, and removal of temp dirs left by dead processes.

    lock = RunLock.acquire("runs/tiny")        # rank 0, for the life of the run; TrainingError if another holds it
    remove_stale_temps(Path("runs/tiny/checkpoints"))

The lock is `fcntl.flock` on `run_dir/.lock`, whose content names the holder (`host pid`). The kernel releases a
flock when its process dies, so a lock file left by a crashed run is simply taken over (with a warning naming the
dead holder). flock works across hosts only on file systems that support it (local disks, NFSv4, Lustre with
`flock`); elsewhere it still protects against a second run on the same host.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import socket
from pathlib import Path

from dist_nmt.errors import TrainingError

log = logging.getLogger(__name__)

# `.tmp-<pid>-...` / `.old-<pid>-...` (checkpoints) and `.<name>.tmp-<pid>-...` (prepared data).
_TEMP = re.compile(r"^\.(?:.+\.)?(?:tmp|old)-(\d+)-")


def holder_alive(pid: int) -> bool:
    """True when a process with this PID exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete `.tmp-<pid>-*` / `.old-<pid>-*` entries of `directory` whose process is gone; return them."""
    removed = []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        match = _TEMP.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not holder_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d temp dir(s) left by dead processes in %s: %s", len(removed), directory,
                 ", ".join(p.name for p in removed))
    return removed


class RunLock:
    """An exclusive, process-lifetime lock on a run directory (`acquire` it; `release` or process exit frees it)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        """Lock `run_dir/.lock` or raise TrainingError naming the host and PID of the run holding it."""
        path = Path(run_dir) / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "an unknown process"
            os.close(fd)
            raise TrainingError(f"{run_dir} is in use by another training run ({holder}, per {path}); wait for it "
                                "to finish or stop it, or set train.run_dir to another directory") from None
        previous = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
        if previous:
            log.warning("taking over %s: its previous holder (%s) is no longer running", path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Empty the lock file (a clean exit leaves nothing to take over) and unlock it."""
        if self._fd >= 0:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1
