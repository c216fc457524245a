"""Stopping a run cleanly: signals, ``--stop-after`` and agreement between ranks.

A stop is only ever taken between two iterations, so that the snapshot it
writes resumes exactly; several processes of one run vote so that they all
stop at the same iteration.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Dict, Optional, Tuple


class NonFiniteLoss(Exception):
    """Raised from the gradients-ready callback to keep a nan/inf update from happening."""

    def __init__(self, iteration: int, loss: float, elsewhere: bool = False) -> None:
        super().__init__(f"loss {loss} at iteration {iteration}")
        self.iteration = iteration
        self.loss = loss
        self.elsewhere = elsewhere  # another GPU's loss, not this process's


def diverged_message(loss: float, iteration: int, base_lr: float, lr: Optional[float] = None,
                     where: str = "") -> str:
    """What a run that diverged says: the loss, where, and what to change."""
    rate = f" (learning rate {lr:g})" if lr is not None else ""
    if base_lr < 0:
        advice = f"base_lr is {base_lr:g}, negative: every update climbs the loss; make it positive"
    else:
        advice = f"lower base_lr (now {base_lr:g}; try {base_lr / 10:g})"
    return f"the loss became {loss}{where} at iteration {iteration}{rate}: training diverged; {advice}"


class StopRequest:
    """A stop asked for by a signal (or ``--stop-after``, which goes the same way).

    The first SIGINT/SIGTERM is recorded and the default handler put back, so
    a second one ends the process at once.  ``shared`` is a value set by the
    parent process of a multi-GPU run, whose workers ignore signals.
    """

    def __init__(self, shared: Any = None, say: Callable[[str], None] = lambda text: None) -> None:
        self.signum: Optional[int] = None
        self.shared = shared
        self.say = say
        self._previous: Dict[int, Any] = {}

    def request(self, signum: int, _frame: Any = None) -> None:
        if self.signum is None:
            self.signum = signum
            self.say(f"{signal.Signals(signum).name}: stopping after this iteration "
                     "(again to abort without a snapshot)")
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    @property
    def requested(self) -> Optional[int]:
        if self.signum is None and self.shared is not None and self.shared.value:
            self.signum = int(self.shared.value)
        return self.signum

    def install(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self.request)

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


class LocalVote:
    """One process decides alone."""

    def agree(self, iteration: int, diverged: bool, stop: bool) -> Tuple[bool, bool]:
        return diverged, stop


class SharedVote:
    """The ranks of a multi-GPU run agree on stopping at each iteration.

    Each rank writes its two flags into the half of ``slots`` for the
    iteration's parity, waits for every rank at ``barrier``, and reads them
    all; the next iteration writes the other half, so a fast rank never
    overwrites flags a slow one is still reading.
    """

    def __init__(self, rank: int, count: int, barrier: Any, slots: Any) -> None:
        self.rank, self.count, self.barrier, self.slots = rank, count, barrier, slots

    def agree(self, iteration: int, diverged: bool, stop: bool) -> Tuple[bool, bool]:
        base = (iteration % 2) * self.count * 2
        self.slots[base + 2 * self.rank] = int(diverged)
        self.slots[base + 2 * self.rank + 1] = int(stop)
        self.barrier.wait()
        flags = self.slots[base: base + 2 * self.count]
        return any(flags[0::2]), any(flags[1::2])
