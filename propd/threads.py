"""The thread count of decoding steps, chosen by their measured time (robust under contention).

A decoding step on a CPU hands work to its threads a few hundred times (each product, attention), each ending at a
barrier. On a shared machine a thread whose core another process holds stalls every barrier, so fewer threads than
cores can be faster (docs/architecture.md, "Threads on a busy machine"). The step loop does what the tree sizer does
for tree sizes: it measures, and re-checks.

:class:`ThreadTuner` keeps a current thread count for steps and the typical time of each kind of step (tree size,
batch size) at that count. It tries a neighbouring count (``probe_steps`` steps at half or double the current one,
within 1 .. the process's count) only when there is reason to: once at the start (the machine may be busy already),
when a kind's recent steps run ``slow`` times its typical time (something else took the cores), and, while below the
process's count, every ``probe_every`` steps to see whether the cores are free again (less often while those probes
do not pay: up to 32x ``probe_every`` apart). It moves when the probe's median step time is below ``margin`` times
the current count's; a probe step ``give_up`` times the current median ends the probe at once (a count that slow
is not the one to move to, and its other steps would only add to the cost). On a quiet machine that is one probe
in all (one to three steps at half the threads). A prefill runs at the steps' count where they moved below the
process's (:meth:`for_prefill`), and the process's own setting is put back when a generate call ends. propd's CPU
kernels compute every output on one thread in a fixed order, so the thread count never changes the output (tested).
"""

from __future__ import annotations

import statistics
from collections import deque

import torch


class ThreadTuner:
    """Chooses the thread count for decoding steps: ``start()``, then ``begin(kind)`` before each step and
    ``end(kind, seconds)`` after it, and ``restore()`` at the end."""

    def __init__(self, fixed: int | None = None, probe_every: int = 12, probe_steps: int = 3, margin: float = 0.92,
                 slow: float = 1.25, window: int = 6, give_up: float = 1.5, set_threads=torch.set_num_threads,
                 get_threads=torch.get_num_threads):
        self._set, self._get = set_threads, get_threads
        self.fixed = fixed  # a count for every step, never probed
        self.max_threads = fixed or max(1, get_threads())
        self.probe_every, self.probe_steps, self.margin, self.slow, self.window = (
            probe_every, probe_steps, margin, slow, window)
        self.give_up = give_up  # a probe step this many times the current count's median ends the probe there
        self._saved = None
        self.switches = self.probes = 0
        self._reset(self.max_threads)

    def _reset(self, current: int) -> None:
        self.current = current
        self._recent: dict[object, deque] = {}  # kind -> its latest step times at the current count
        self._typical: dict[object, float] = {}  # kind -> its typical step time at the current count
        self._probe: tuple[object, int, list[float]] | None = None  # (kind, count, times) while probing
        self._probe_down = True  # the next probe's direction: fewer threads first (at the start, when slow)
        self._since_up = 0  # steps since the last probe for more threads
        self._every = self.probe_every  # grows while probes for more threads do not pay

    def start(self) -> None:
        """At the start of a generate call: note the process's thread count (the most steps may use, and what
        :meth:`restore` puts back)."""
        self._saved = self._get()
        if self.fixed is None and self._saved != self.max_threads:  # the process's setting changed: start over
            self.max_threads = max(1, self._saved)
            self._reset(self.max_threads)

    def threads_for(self, kind: object) -> int:
        """The thread count the next step of ``kind`` runs with (starting a probe when one is due)."""
        if self.fixed is not None:
            return self.fixed
        if self._probe is None:
            target = self._due(kind)
            if target is not None:
                self._probe = (kind, target, [])
                self.probes += 1
        if self._probe is not None and self._probe[0] == kind:
            return self._probe[1]
        return self.current

    def _due(self, kind: object) -> int | None:
        """The count to probe before this step of ``kind``, if a probe is due."""
        recent = self._recent.get(kind)
        if recent is None or len(recent) < self.window:
            return None
        down, up = max(1, self.current // 2), min(self.max_threads, self.current * 2)
        if down < self.current and (self._probe_down or statistics.median(recent) > self.slow * self._typical[kind]):
            self._probe_down = False
            return down
        if up > self.current and self._since_up >= self._every:
            self._since_up = 0
            return up
        return None

    def begin(self, kind: object) -> None:
        n = self.threads_for(kind)
        if self._get() != n:
            self._set(n)

    def end(self, kind: object, seconds: float) -> None:
        """Record a step of ``kind`` that took ``seconds``; settle a probe when it has its steps."""
        if self._probe is not None and self._probe[0] == kind:
            _, n, times = self._probe
            times.append(seconds)
            now = statistics.median(self._recent[kind])
            if len(times) < self.probe_steps and seconds < self.give_up * now:
                return
            self._probe = None  # its steps are in, or one was so slow that the rest would only cost more
            if len(times) == self.probe_steps and statistics.median(times) < self.margin * now:
                went_down = n < self.current
                self._reset(n)
                self.switches += 1
                self._probe_down = went_down  # fewer paid: try the next count down too (one probe)
                self._recent[kind] = deque(times, maxlen=self.window)
                self._typical[kind] = statistics.median(times)
            else:
                self._typical[kind] = now  # the slowdown, if any, is how things are now: no probe for it again
                if n > self.current:
                    self._every = min(2 * self._every, 32 * self.probe_every)
            return
        recent = self._recent.setdefault(kind, deque(maxlen=self.window))
        recent.append(seconds)
        if kind not in self._typical and len(recent) == self.window:
            self._typical[kind] = statistics.median(recent)
        self._since_up += 1

    def for_prefill(self) -> None:
        """Set the count for a prefill: a fixed count, or the current one where the steps moved below the process's
        count (the cores are busy: a prefill's parallel regions wait for a thread that lost its core as a step's
        do), else the process's count (noted by :meth:`start`)."""
        n = self.fixed or (self.current if self.current < self.max_threads else self._saved)
        if n is not None and self._get() != n:
            self._set(n)

    def restore(self) -> None:
        """Put the process's thread count back (when a generate call ends)."""
        if self._saved is not None and self._get() != self._saved:
            self._set(self._saved)
