"""How many CPU threads a fine-tuning uses: torch's count, a fixed count, or one while one is faster.

A training step on the CPU is a few thousand operations (attention runs a cell and a few heads at a time), each a
parallel region that waits for its slowest thread. When another process holds one of the cores, every region
waits for the thread the scheduler took away: on 2 cores with one of them busy, a full-size bf16 step took 16.3 s
on 2 threads and 3.9 s on 1 (2.5 s on 2 threads with the cores free; ``benchmarks/bench_threads.py``). Which count wins
depends on what else runs, and that changes during a training, so with ``threads="auto"`` :class:`CpuThreads`
measures it: it times a few steps on torch's count and a few on one thread (seconds per unit of work, so that
batch lengths do not bias it), keeps the faster, and measures again later, less often while the choice holds.

The thread count changes the order of some sums, so results differ in the last bits between counts (and then
more, as training amplifies them). With ``"auto"`` the counts follow the machine's load, so a rerun or a resumed
run no longer repeats a run bit for bit; that is why it is not the default (None keeps torch's count).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

logger = logging.getLogger(__name__)

__all__ = ["CpuThreads"]


class CpuThreads:
    """torch's intra-op thread count during a CPU training: fixed, or chosen by timing steps.

    Parameters
    ----------
    device
        The training device; on anything but the CPU this does nothing.
    threads
        None: torch's count, untouched. A number: that count for the training. ``"auto"``: torch's count,
        switched to 1 while that measures faster. The count torch had is given back by :meth:`close`.
    probe
        Timed steps per count in one comparison (the first step of a training, a warm-up, is not timed).
    recheck
        Steps on the chosen count before the first new comparison; the wait doubles (up to 8x) while the choice
        holds and starts over when it changes.
    """

    def __init__(self, device: torch.device, threads: int | str | None = None, *, probe: int = 2,
                 recheck: int = 40) -> None:
        self.base = torch.get_num_threads()
        self.on_cpu = device.type == "cpu"
        self.auto = self.on_cpu and threads == "auto" and self.base > 1
        self.probe, self.recheck = max(1, probe), max(1, recheck)
        fixed = self.on_cpu and isinstance(threads, int)
        self.current = threads if fixed else self.base
        if self.current != self.base:
            torch.set_num_threads(self.current)
        self.choices: list[tuple[int, dict[int, float]]] = []  # (step, {count: seconds per unit of work})
        self._steps = 0
        self._wait = self.recheck
        self._next = 1  # the step at which the next comparison starts
        self._times: dict[int, list[float]] = {}

    def _plan(self) -> int:
        """The count for step ``self._steps``."""
        if not self.auto or self._steps < self._next:
            return self.current
        offset = self._steps - self._next
        return (self.base, 1)[offset // self.probe] if offset < 2 * self.probe else self.current

    @contextmanager
    def step(self, work: float) -> Iterator[None]:
        """Run one training step under the count; ``work`` is its size in any unit proportional to its cost."""
        count = self._plan()
        if count != torch.get_num_threads():
            torch.set_num_threads(count)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        if self.auto and self._steps >= self._next:
            self._times.setdefault(count, []).append(seconds / max(work, 1e-12))
            if self._steps - self._next == 2 * self.probe - 1:
                self._decide()
        self._steps += 1

    def _decide(self) -> None:
        rates = {count: statistics.median(times) for count, times in self._times.items()}
        self._times = {}
        best = min(rates, key=rates.__getitem__)
        self.choices.append((self._steps, rates))
        other = self.base if best == 1 else 1
        if best != self.current or len(self.choices) == 1:
            why = " (another job may share the cores)" if best == 1 else ""
            logger.info("threads auto: CPU training on %d thread%s from step %d, %.1fx faster than on %d%s",
                        best, "" if best == 1 else "s", self._steps + 2, rates[other] / rates[best], other, why)
        if best != self.current:
            self._wait = self.recheck
        else:
            self._wait = min(8 * self.recheck, 2 * self._wait)
        self.current = best
        torch.set_num_threads(best)
        self._next = self._steps + 1 + self._wait

    def settle(self) -> None:
        """Set the chosen count (after an epoch's steps, which may end inside a comparison), e.g. for validation."""
        if self.on_cpu and torch.get_num_threads() != self.current:
            torch.set_num_threads(self.current)

    def close(self) -> None:
        """Give torch back the count it had."""
        if torch.get_num_threads() != self.base:
            torch.set_num_threads(self.base)
