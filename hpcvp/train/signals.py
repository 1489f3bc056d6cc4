"""Preemption signals: the handler only records that a signal came; the trainer acts on it at the
next step boundary, after all ranks agreed (so nobody stops alone and nobody saves twice)."""

from __future__ import annotations

import signal
import threading
import time

# Process exit status meaning "state saved, please requeue me" (EX_TEMPFAIL in sysexits.h).
EXIT_REQUEUE = 75
# Exit status meaning "a peer rank (a node) was lost for good: stopped without requeue; the last
# checkpoint is intact, relaunch on the remaining capacity" (EX_PROTOCOL in sysexits.h).
EXIT_PEER_LOST = 76


def parse_signal(name: str | int) -> signal.Signals:
    """'USR2', 'SIGUSR2' or 12 -> signal.SIGUSR2.  SIGUSR1 is refused: NCCL uses it internally."""
    if isinstance(name, int) or (isinstance(name, str) and name.strip().isdigit()):
        sig = signal.Signals(int(name))
    else:
        text = str(name).strip().upper()
        if not text.startswith("SIG"):
            text = "SIG" + text
        try:
            sig = signal.Signals[text]
        except KeyError:
            raise ValueError(f"preempt_signal: unknown signal {name!r}") from None
    if sig == signal.SIGUSR1:
        raise ValueError("preempt_signal: SIGUSR1 is reserved (NCCL uses it); use USR2 (submitit's default)")
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"preempt_signal: {sig.name} cannot be caught")
    return sig


class PreemptionFlag:
    """Installs handlers for the requeue signal and SIGTERM that set a flag.

    ``signum`` is the first signal received (0 when none).  Use as a context manager, or call
    ``install()`` / ``uninstall()``; previous handlers are restored on uninstall.
    """

    def __init__(self, requeue_signal: str | int = "USR2", handle_sigterm: bool = True):
        self.signals = [parse_signal(requeue_signal)]
        if handle_sigterm and signal.SIGTERM not in self.signals:
            self.signals.append(signal.SIGTERM)
        self.signum = 0
        self.received_at: float | None = None
        self._previous: dict[int, object] = {}
        self.installed = False

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def _handle(self, signum, frame) -> None:
        # Only assignments here: no logging or I/O inside a signal handler.
        if self.signum == 0:
            self.signum = signum
            self.received_at = time.time()

    def install(self) -> bool:
        """Install the handlers; returns False (and does nothing) outside the main thread, where
        Python cannot install signal handlers."""
        if self.installed:
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self.installed = True
        return True

    def uninstall(self) -> None:
        if not self.installed:
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self.installed = False

    def __enter__(self) -> PreemptionFlag:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
