"""Progress inside a long measurement: steps done (a document forward, a needle prompt) and the time left.

The time left is estimated from the work done so far, in the steps' own unit (tokens through the model, so a
16k document counts four 4k ones and a measurement reused from another method counts nothing), and from the
clock since the first step ended: what happened before it (loading the model) is not work of this kind.
Pure Python: job.py puts the time left in the note it gives the caller's progress display (job.Progress).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence


class StepTimer:
    """Steps of a measurement done, of `work` (each step's cost, in any unit; 0 for a step that costs
    nothing), with the time left estimated from the cost done since the first step."""

    def __init__(self, work: Sequence[float], clock: Callable[[], float] = time.monotonic) -> None:
        self.work, self.clock = list(work), clock
        self.done = 0
        self._total = sum(self.work)
        self._done_work = 0.0
        self._first: tuple[float, float] | None = None  # (clock, work done) when the first step ended

    @property
    def total(self) -> int:
        return len(self.work)

    def step(self) -> None:
        """One more step done (steps past `work`'s end count as costing nothing)."""
        self._done_work += self.work[self.done] if self.done < self.total else 0.0
        self.done += 1
        if self._first is None:
            self._first = (self.clock(), self._done_work)

    def seconds_left(self) -> float | None:
        """Estimated seconds until the last step ends: the rate of work since the first step, over the work
        left; None until some work after the first step is done."""
        if self._first is None:
            return None
        started, work_then = self._first
        measured = self._done_work - work_then
        if measured <= 0:
            return None if self._done_work < self._total else 0.0
        return (self.clock() - started) / measured * (self._total - self._done_work)

    def time_left(self) -> str:
        """'about 4 min 10 s left', or '' while nothing can be estimated."""
        seconds = self.seconds_left()
        return "" if seconds is None else f"about {duration(seconds)} left"

    def line(self, label: str, unit: str) -> str:
        """A status line: 'eval: 3/48 document forwards done, about 4 min 10 s left'."""
        left = self.time_left()
        return f"{label}: {self.done}/{self.total} {unit} done" + (f", {left}" if left else "")


def duration(seconds: float) -> str:
    """'45 s', '4 min 10 s', '2 h 05 min': what a person reads at a glance."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
