"""A preallocated static KV cache with per-row lengths (after gpt-fast's ``KVCache``, extended for batches).

Layout: ``k`` and ``v`` are (L, B, H_kv, S, D). Row b holds its committed tokens at positions ``0 .. lengths[b]-1``;
everything at or beyond ``lengths[b]`` is scratch. A decoding step writes its tree nodes into scratch at
``lengths[b] + node_index``; after verification :meth:`commit` gathers the accepted path to
``lengths[b] .. lengths[b] + n - 1`` in one gather/scatter over all layers. Scratch is never attended (the attention
mask only opens committed positions and the current tree's ancestors), so nothing stale can leak.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.host_lengths = [0] * batch  # mirror of ``lengths`` kept on the host, so shapes need no sync
        self._store = (self.k, self.v)  # the whole buffers ``k``, ``v`` view the first rows of (select_rows, add_rows)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, capacity: int) -> None:
        """Grow the buffers (rarely: only when a sizer picks a tree larger than the initial slack)."""
        if capacity <= self.capacity:
            return
        pad = capacity + 64 - self.capacity
        self.k = torch.nn.functional.pad(self.k, (0, 0, 0, pad))
        self.v = torch.nn.functional.pad(self.v, (0, 0, 0, pad))
        self._store = (self.k, self.v)

    def write(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write (B, H, T, D) keys/values at cache positions ``pos`` (B, T), in the cache's dtype (under autocast a
        projection's output may be narrower)."""
        idx = pos[:, None, :, None].expand_as(k)  # (B, H, T, D)
        self.k[layer].scatter_(2, idx, k.to(self.k.dtype))
        self.v[layer].scatter_(2, idx, v.to(self.v.dtype))

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's whole (B, H, capacity, D) key and value buffers, for writers that index them themselves."""
        return self.k[layer], self.v[layer]

    def view(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer, :, :, :length], self.v[layer, :, :, :length]

    def commit(self, offsets: torch.Tensor, counts: torch.Tensor, host_counts: list[int],
               in_place: bool = False) -> None:
        """Keep the accepted nodes of each row.

        ``offsets`` (B, A): scratch offsets (node indices) of the accepted path, root first, ascending; ``counts`` (B,)
        how many of them are real (the rest is padding and lands in scratch). They move to
        ``lengths[b] + 0 .. counts[b]-1`` and ``lengths`` grows by ``counts``. ``in_place``: the caller knows that
        every real offset i is i already (nothing to move).
        """
        L, B, H, _, D = self.k.shape
        A = offsets.shape[1]
        if A == 1 or in_place:  # e.g. the root alone (node 0, already at lengths[b]): nothing moves
            self.advance(counts, host_counts)
            return
        src = (self.lengths[:, None] + offsets)[None, :, None, :, None].expand(L, B, H, A, D)
        dst = (self.lengths[:, None] + torch.arange(A, device=offsets.device))[None, :, None, :, None]
        dst = dst.expand(L, B, H, A, D)
        for buf in (self.k, self.v):
            moved = buf.gather(3, src)  # (L, B, H, A, D), read everything before writing
            buf.scatter_(3, dst, moved)
        self.advance(counts, host_counts)

    def put_rows(self, rows: torch.Tensor, part: "KVCache", length: int) -> None:
        """Copy positions ``0 .. length-1`` of every row of ``part`` (a cache of ``len(rows)`` rows, filled apart, e.g.
        by one prefill group) into batch rows ``rows``; lengths are left to the caller's :meth:`advance`."""
        self.k[:, rows, :, :length] = part.k[:, :, :, :length]
        self.v[:, rows, :, :length] = part.v[:, :, :, :length]

    def add_rows(self, part: "KVCache") -> None:
        """Append ``part``'s rows (filled apart, e.g. the prefill of prompts joining a running batch) after this
        cache's rows, with their lengths. The buffers grow to ``part``'s capacity if it is larger; rows freed by
        :meth:`select_rows` are reused, so a row that joins after one left costs a copy of its own positions only."""
        n, k = len(self.host_lengths), len(part.host_lengths)
        L, _, H, S, D = self.k.shape
        store = self._store
        if (part.capacity > S or store[0].shape[1] < n + k or store[0].shape[3] != S
                or store[0].data_ptr() != self.k.data_ptr()):
            # new buffers: only this cache's committed positions are copied (the rest is scratch), once
            cap = S if part.capacity <= S else part.capacity + 64  # as reserve() grows
            used = max(self.host_lengths, default=0)
            store = tuple(torch.zeros(L, n + k, H, cap, D, dtype=buf.dtype, device=buf.device)
                          for buf in (self.k, self.v))
            store[0][:, :n, :, :used], store[1][:, :n, :, :used] = self.k[:, :, :, :used], self.v[:, :, :, :used]
            self._store = store
        length = max(part.host_lengths, default=0)
        store[0][:, n:n + k, :, :length] = part.k[:, :, :, :length]
        store[1][:, n:n + k, :, :length] = part.v[:, :, :, :length]
        self.k, self.v = store[0][:, :n + k], store[1][:, :n + k]
        self.lengths = torch.cat([self.lengths, part.lengths.to(self.lengths.device)])
        self.host_lengths = self.host_lengths + list(part.host_lengths)

    def advance(self, counts: torch.Tensor, host_counts: list[int]) -> None:
        self.lengths += counts
        self.host_lengths = [a + b for a, b in zip(self.host_lengths, host_counts)]

    def select_rows(self, rows: list[int]) -> None:
        """Keep only the given batch rows, in that order (finished rows leave the batch and cost nothing more).

        In place: slot i receives row ``rows[i]`` where they differ (its committed positions only; the rest is
        scratch), and the buffers become views of their first ``len(rows)`` rows. A leaving row costs a copy of the
        rows that move into its slot, not a copy of every row's whole capacity (``Decoder`` fills each hole with a row
        from the tail, so at most one row moves per row that leaves)."""
        n = len(rows)
        if len(set(rows)) != n or not all(0 <= r < len(self.host_lengths) for r in rows):
            raise ValueError(f"select_rows takes distinct batch rows, got {rows}")
        moves = [(i, r) for i, r in enumerate(rows) if r != i]
        if moves:
            dev = self.k.device
            dst = torch.tensor([i for i, _ in moves], dtype=torch.long, device=dev)
            src = torch.tensor([r for _, r in moves], dtype=torch.long, device=dev)
            length = max(self.host_lengths[r] for _, r in moves)
            for buf in (self.k, self.v):
                buf[:, dst, :, :length] = buf[:, src, :, :length]  # the right side is gathered before the write
        self.k, self.v = self.k[:, :n], self.v[:, :n]
        idx = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.lengths = self.lengths.index_select(0, idx)
        self.host_lengths = [self.host_lengths[r] for r in rows]
