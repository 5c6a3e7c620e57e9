"""A watchdog for silent ranks (fairseq's --heartbeat-timeout): a rank that stops making progress ends the job.

    dog = Watchdog.start(timeout=cfg.dist.heartbeat_timeout_seconds, rank=world.rank, size=world.size,
                         heartbeat_dir=Path(run_dir) / "heartbeat", last_good=checkpointer.latest_good_name)
    dog.tick()                                    # after every finished update
    with dog.phase("validation"): ...             # long legitimate phases get `long_factor` x the timeout

A background thread per rank touches `heartbeat_dir/rank-<r>` every second (liveness) and checks when the main loop
last ticked (progress). A frozen rank (SIGSTOP, stuck file system, partitioned node) stops both; its peers block in
the next collective and stop making progress too. After `timeout` seconds without progress each live rank logs one
line, naming the ranks whose liveness file went stale (when the heartbeat directory is shared) and the last good
checkpoint, then `os._exit(EXIT_CODE)`: horovodrun/mpirun see a failed worker and tear the job down. Gloo's own
receive timeout (dist.gloo_timeout_seconds, 300 s) would otherwise hold the job for minutes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_CODE = 75
_BEAT_SECONDS = 1.0


class Watchdog:
    """Progress watchdog of one rank (see the module docstring); `timeout` 0 makes every method a no-op."""

    def __init__(self, timeout: float, rank: int, size: int, heartbeat_dir: Path | None,
                 last_good: Callable[[], str], long_factor: float = 10.0) -> None:
        self.timeout, self.rank, self.size, self.long_factor = timeout, rank, size, long_factor
        self.heartbeat_dir, self.last_good = heartbeat_dir, last_good
        self.last_tick, self.limit, self.what = time.monotonic(), timeout * long_factor, "start-up"
        self._done = threading.Event()

    @classmethod
    def start(cls, timeout: float, rank: int, size: int, heartbeat_dir: Path | None,
              last_good: Callable[[], str]) -> Watchdog:
        """A running watchdog (daemon thread) unless `timeout` is 0; starts in a long phase (first hybridize)."""
        dog = cls(timeout, rank, size, heartbeat_dir, last_good)
        if timeout > 0:
            if heartbeat_dir is not None:
                with contextlib.suppress(OSError):
                    heartbeat_dir.mkdir(parents=True, exist_ok=True)
            dog._beat()  # before the first collective: a peer frozen right after it still leaves a file to go stale
            threading.Thread(target=dog._run, name="dist_nmt-watchdog", daemon=True).start()
        return dog

    def tick(self, what: str = "training") -> None:
        """The main loop made progress; the next deadline is `timeout` from now."""
        self.last_tick, self.limit, self.what = time.monotonic(), self.timeout, what

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """A long legitimate phase (validation, checkpoint save, first step): `long_factor` x the timeout."""
        self.last_tick, self.limit, self.what = time.monotonic(), self.timeout * self.long_factor, what
        try:
            yield
        finally:
            self.tick()

    def stop(self) -> None:
        """End the thread (normal end of training)."""
        self._done.set()

    def _run(self) -> None:
        while not self._done.wait(_BEAT_SECONDS):
            self._beat()
            silent = time.monotonic() - self.last_tick
            if silent > self.limit and not self._done.is_set():
                self._fire(silent)

    def _beat(self) -> None:
        if self.heartbeat_dir is not None:
            with contextlib.suppress(OSError):
                (self.heartbeat_dir / f"rank-{self.rank}").write_text(f"{os.getpid()}\n")

    def stale_peers(self) -> list[int]:
        """Ranks whose liveness file is older than 5 heartbeats (empty when the directory is not shared)."""
        stale = []
        if self.heartbeat_dir is None:
            return stale
        now = time.time()
        for rank in range(self.size):
            try:
                if now - (self.heartbeat_dir / f"rank-{rank}").stat().st_mtime > 5 * _BEAT_SECONDS:
                    stale.append(rank)
            except OSError:
                continue
        return stale

    def _fire(self, silent: float) -> None:
        stale = [r for r in self.stale_peers() if r != self.rank]
        who = (f"rank(s) {', '.join(map(str, stale))} stopped answering (no heartbeat)" if stale
               else "a peer rank stopped answering or this rank is stuck")
        try:
            good = self.last_good() or "none yet"
        except Exception:  # noqa: BLE001 - the exit must happen whatever the file system does
            good = "unknown"
        log.error("rank %d: no progress for %.0f s during %s (dist.heartbeat_timeout_seconds=%g): %s; ending the "
                  "job. Last good checkpoint: %s", self.rank, silent, self.what, self.timeout, who, good)
        for handler in logging.getLogger().handlers + log.handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        sys.stderr.flush()
        os._exit(EXIT_CODE)
