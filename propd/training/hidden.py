"""Final normed hidden states of token sequences, kept as the answers are generated.

A greedy ``ar`` decoder computes the final normed hidden state of every prompt position (its prefill) and of every
generated token but the last (the step that feeds it): EAGLE's training features (:mod:`propd.training.eagle`).
:class:`HiddenRecorder`, an observer of that decoder (``Decoder(observers=...)``), keeps them as it goes, so that no
second forward pass over prompt + answer is needed; :class:`FeatureStore` saves them by sequence.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from propd.hookspecs import hookimpl
from propd.training.trainer import _save


class HiddenRecorder:
    """Each row's final normed hidden states (bf16, on the CPU) while :meth:`recording`: the prompt's
    (``propd_rows_begin``: (P, H)) then each step's accepted path (``propd_after_step``'s ``path_hidden``). For a row
    of P prompt ids and N generated ids that is P + N - 1 states; a step that accepts more than the row keeps (its
    token budget or an end-of-sequence token cut the step) leaves extra states, which :meth:`take` drops."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype = dtype
        self._rows: dict[int, list[torch.Tensor]] | None = None  # row id -> its states so far; None: not recording

    @contextmanager
    def recording(self):
        self._rows = {}
        try:
            yield self
        finally:
            self._rows = None

    def take(self, row: int, n: int) -> torch.Tensor:
        """Row ``row``'s first ``n`` states (n, H) of the current recording."""
        parts = self._rows[row]
        h = torch.cat(parts) if len(parts) > 1 else parts[0]
        if h.shape[0] < n:
            raise RuntimeError(f"row {row} has {h.shape[0]} recorded hidden states, {n} asked")
        return h[:n]

    @hookimpl
    def propd_rows_begin(self, rows):
        if self._rows is None:
            return
        lengths = rows.prompt_lengths.tolist()
        hidden = rows.hidden.to(device="cpu", dtype=self.dtype)
        for b, r in enumerate(rows.row_ids):
            self._rows[r] = [hidden[b, : lengths[b]].clone()]

    @hookimpl
    def propd_rows_join(self, rows):
        self.propd_rows_begin(rows=rows)  # kept by row id: the same for rows that join a running batch

    @hookimpl
    def propd_after_step(self, ctx, acceptance, path_hidden):
        if self._rows is None:
            return
        counts = (acceptance.accept_len + 1).tolist()
        h = path_hidden.to(device="cpu", dtype=self.dtype)
        for b, r in enumerate(ctx.row_ids):
            self._rows[r].append(h[b, : counts[b]])


def sequence_key(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:20]


class FeatureStore:
    """Hidden states (L, H) of token sequences of length L, by their ids, saved in ``directory`` one file per batch
    (a run stopped midway keeps the batches it saved). The last position's state may be zero: EAGLE's training never
    reads it (:func:`propd.training.eagle._batch_loss` reads f_t for t <= L - 2)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.recorder = HiddenRecorder()
        self._by_key: dict[str, torch.Tensor] = {}
        self._files = 0
        for f in sorted(self.dir.glob("*.pt")):
            self._by_key.update(torch.load(f, map_location="cpu", weights_only=True))
            self._files += 1

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, ids: list[int]) -> torch.Tensor | None:
        h = self._by_key.get(sequence_key(ids))
        return h if h is not None and h.shape[0] == len(ids) else None

    def add(self, items: list[tuple[list[int], torch.Tensor]]) -> None:
        """Keep and save states (L, H) for each sequence of ids (L)."""
        batch = {sequence_key(ids): h for ids, h in items}
        if not batch:
            return
        _save(self.dir / f"{self._files:06d}.pt", batch)
        self._files += 1
        self._by_key.update(batch)

    def add_recorded(self, prompts: list[list[int]], answers: list[list[int]]) -> None:
        """Keep the recorder's states for generated rows 0 .. len(prompts) - 1 of its current recording: prompt +
        answer, the last position zero."""
        items = []
        for r, (p, a) in enumerate(zip(prompts, answers)):
            n = len(p) + len(a)
            h = self.recorder.take(r, n - 1)
            items.append((p + a, torch.cat([h, h.new_zeros(1, h.shape[1])])))
        self.add(items)
