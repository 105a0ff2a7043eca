"""How long a run's stages take, and progress lines with an ETA for long runs.

`stage(ctx, "attribution")` is a context manager that adds its wall time to the run's
`StageTimes` (on `Context.stages`); the runner appends the table to the report, and
the CLI prints it at the end, so the slowest stage of a long run is visible.  Items
resumed from the store cost nothing and add nothing.  `EtaProgress` is a progress
callback (step, done, total) that prints "step done/total, elapsed, ETA" lines at most
every `every` seconds; its ETA counts only items that took time (resumed ones are free).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class StageTimes:
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1

    def as_dict(self) -> dict[str, dict]:
        """{stage: {"seconds", "calls"}}, slowest first."""
        order = sorted(self.seconds, key=lambda k: -self.seconds[k])
        return {k: {"seconds": round(self.seconds[k], 3), "calls": self.calls[k]} for k in order}

    @classmethod
    def from_dict(cls, data: dict[str, dict]) -> StageTimes:
        """The inverse of `as_dict`."""
        return cls({k: v["seconds"] for k, v in data.items()}, {k: v["calls"] for k, v in data.items()})

    def text(self) -> str:
        if not self.seconds:
            return "stage timings: nothing computed in this process (every item came from the store)"
        total = sum(self.seconds.values())
        parts = [
            f"{k} {v['seconds']:.1f} s ({100 * v['seconds'] / total:.0f}%, {v['calls']} calls)"
            for k, v in self.as_dict().items()
        ]
        return "stage timings (this process; wall time, shared machine): " + "; ".join(parts)

    def markdown(self) -> str:
        return f"\n{self.text()}.\n"


def times_of(ctx) -> StageTimes:
    """The run's StageTimes (`ctx.stages`; created on contexts that have none)."""
    times = getattr(ctx, "stages", None)
    if times is None:
        times = StageTimes()
        ctx.stages = times
    return times


@contextmanager
def stage(ctx, name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        times_of(ctx).add(name, time.perf_counter() - start)


class EtaProgress:
    """Progress callback printing "step done/total, elapsed, ETA" at most every `every` seconds (and at the end
    of each step of more than one item: the "known" checks come one item at a time).  ETA = remaining items x
    mean time of the items that took more than `resumed_below` s (resumed items are not counted)."""

    def __init__(self, out: TextIO | None = None, every: float = 30.0, resumed_below: float = 0.05):
        self.out, self.every, self.resumed_below = out, every, resumed_below
        self.state: dict[str, dict] = {}
        self.previous = time.perf_counter()  # the last callback of any step (or the creation)

    def __call__(self, step: str, done: int, total: int) -> None:
        now = time.perf_counter()
        took, self.previous = now - self.previous, now
        s = self.state.setdefault(step, {"start": now - took, "printed": -1e9, "work": 0.0, "worked": 0})
        if took > self.resumed_below:
            s["work"] += took
            s["worked"] += 1
        if now - s["printed"] >= self.every or (done == total and total > 1):
            s["printed"] = now
            print(self.line(step, done, total, now - s["start"]), file=self.out or sys.stderr, flush=True)

    def eta(self, step: str, done: int, total: int) -> float | None:
        s = self.state.get(step)
        if not s or not s["worked"]:
            return None
        return (total - done) * s["work"] / s["worked"]

    def line(self, step: str, done: int, total: int, elapsed: float) -> str:
        eta = self.eta(step, done, total)
        return (
            f"{step}: {done}/{total}, elapsed {_duration(elapsed)}, "
            f"ETA {_duration(eta) if eta is not None else 'unknown'}"
        )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
