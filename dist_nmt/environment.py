"""The process environment, set before anything imports MXNet (Sockeye's `pre_mxnet.init()` for the same reason).

    stop = environment.init(["-m", "dist_nmt.cli", *sys.argv[1:]])   # first statement of an entry point

OpenMP reads `OMP_NUM_THREADS` once, when MXNet's library loads, and `LD_PRELOAD` (tcmalloc) only works at process
start; a signal arriving during the slow start-up must not kill a run that is about to resume. So the one entry
point (`dist_nmt.cli.main`, with `python -m dist_nmt.train` as an alias) calls `init` before its first MXNet import.
"""
from __future__ import annotations

import signal
from collections.abc import Sequence

from dist_nmt import allocator, distributed, precision

AMX_STATUS = "off: environment.init has not run"  # what `precision.enable_amx` did in this process, for the log


class StopSignal:
    """Remembers SIGTERM/SIGINT/SIGUSR1 so the training loop can checkpoint and exit at the next update boundary.

    A second signal raises KeyboardInterrupt (the user insists).
    """

    def __init__(self) -> None:
        self.received = 0
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = signum


def init(reexec_argv: Sequence[str] | None) -> StopSignal:
    """Re-execute on tcmalloc (when `reexec_argv`, the interpreter arguments of this command, is given), set the
    OpenMP/MXNet thread counts from the launcher's local process count, bound MXNet's oneDNN primitive cache,
    enable AMX where the CPU has it, and install the stop-signal handlers.

    Returns only in the process that will do the work; idempotent.
    """
    if reexec_argv is not None:
        allocator.preload_tcmalloc(list(reexec_argv))
    distributed.configure_threads()
    allocator.bound_primitive_cache()
    global AMX_STATUS
    AMX_STATUS = precision.enable_amx()
    return StopSignal()
