"""The thread count of decoding steps, chosen by their measured time (robust under contention).

A decoding step on a CPU is a few hundred short parallel regions (each product, attention, norm), each ending at a
barrier. On a shared machine a thread whose core another process holds stalls every barrier, so fewer threads than
cores can be faster (docs/architecture.md, "Threads on a busy machine"). The step loop does what the tree sizer does
for tree sizes: it measures, and re-checks.

:class:`ThreadTuner` keeps a current thread count for steps and, every ``probe_every`` steps of a kind (tree size,
batch size), runs ``probe_steps`` steps at a neighbouring count (half or double the current one, within 1 .. the
count the process had); it moves there when their median step time is below ``margin`` times the current count's
recent median. Probes that do not pay come less often (up to 8x ``probe_every`` apart), as a probe's steps run at
a count that was slower. The candidates never exceed the process's own setting, and that setting is put back before
each prefill and when a generate call ends. propd's CPU kernels compute every output on one thread in a fixed
order, so the thread count never changes the output (tested).
"""

from __future__ import annotations

import statistics
from collections import deque

import torch


class ThreadTuner:
    """Chooses the thread count for decoding steps: ``start()``, then ``begin(kind)`` before each step and
    ``end(kind, seconds)`` after it, and ``restore()`` at the end."""

    def __init__(self, fixed: int | None = None, probe_every: int = 12, probe_steps: int = 3, margin: float = 0.92,
                 window: int = 8, set_threads=torch.set_num_threads, get_threads=torch.get_num_threads):
        self._set, self._get = set_threads, get_threads
        self.fixed = fixed  # a count for every step, never probed
        self.max_threads = fixed or max(1, get_threads())
        self.current = self.max_threads
        self._saved = None
        self.probe_every, self.probe_steps, self.margin, self.window = probe_every, probe_steps, margin, window
        self._recent: dict[object, deque] = {}  # kind -> recent step times at the current count
        self._since: dict[object, int] = {}  # kind -> steps since its last probe
        self._probe: tuple[object, int, list[float]] | None = None  # (kind, count, times) while probing
        self._next_down = True  # probe fewer threads first, then more, in turn
        self._every = probe_every  # grows after each probe that does not pay, back to probe_every on a switch
        self.switches = 0

    def _neighbours(self) -> list[int]:
        down, up = max(1, self.current // 2), min(self.max_threads, self.current * 2)
        return [n for n in ((down, up) if self._next_down else (up, down)) if n != self.current]

    def start(self) -> None:
        """At the start of a generate call: note the process's thread count (the most steps may use, and what
        :meth:`restore` puts back)."""
        self._saved = self._get()
        if self.fixed is None and self._saved != self.max_threads:  # the process's setting changed: start over
            self.max_threads = self.current = max(1, self._saved)
            self._recent, self._since, self._probe = {}, {}, None

    def threads_for(self, kind: object) -> int:
        """The thread count the next step of ``kind`` runs with (starting a probe when one is due)."""
        if self.fixed is not None:
            return self.fixed
        if self._probe is None and self._since.get(kind, 0) >= self._every and \
                len(self._recent.get(kind, ())) >= self.probe_steps:
            options = self._neighbours()
            if options:
                self._probe = (kind, options[0], [])
                self._next_down = not self._next_down
            self._since[kind] = 0
        if self._probe is not None and self._probe[0] == kind:
            return self._probe[1]
        return self.current

    def begin(self, kind: object) -> None:
        n = self.threads_for(kind)
        if self._get() != n:
            self._set(n)

    def end(self, kind: object, seconds: float) -> None:
        """Record a step of ``kind`` that took ``seconds``; settle a probe when it has its steps."""
        if self._probe is not None and self._probe[0] == kind:
            _, n, times = self._probe
            times.append(seconds)
            if len(times) >= self.probe_steps:
                self._probe = None
                recent = self._recent.get(kind)
                if recent and statistics.median(times) < self.margin * statistics.median(recent):
                    self.current = n
                    self.switches += 1
                    self._recent = {kind: deque(times, maxlen=recent.maxlen)}  # others re-measure at the new count
                    self._since = {}
                    self._every = self.probe_every
                else:  # probes cost steps at a worse count: fewer of them while the answer stays the same
                    self._every = min(2 * self._every, 8 * self.probe_every)
            return
        recent = self._recent.setdefault(kind, deque(maxlen=self.window))
        recent.append(seconds)
        self._since[kind] = self._since.get(kind, 0) + 1

    def restore(self) -> None:
        """Put the process's thread count back (before a prefill, and when a generate call ends)."""
        if self._saved is not None and self._get() != self._saved:
            self._set(self._saved)
