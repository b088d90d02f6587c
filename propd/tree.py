"""Token trees for parallel decoding.

A tree is given Medusa-style (Cai et al. 2023, "Medusa: Simple LLM Inference Acceleration Framework with
Multiple Decoding Heads") as a list of *paths*: each path is a tuple of ranks ``(r_1, ..., r_d)`` meaning "take
the r_1-th guess of head 0, then the r_2-th guess of head 1, ...". Node 0 is the root (the last verified token,
not yet in the KV cache); node ``i >= 1`` is ``paths[i-1]`` after sorting by (depth, path). Every prefix of a path
must itself be a path, so the nodes form a tree in topological order (a parent's index is below its children's).

From the paths we derive, once per shape and on the target device:

* ``parents``  (T,)   parent index of each node (-1 for the root)
* ``depths``   (T,)   0 for the root
* ``ranks``    (T,)   rank within the head's top-k guesses (0 for the root)
* ``mask``     (T, T) ``mask[i, j]`` is True iff j is i or an ancestor of i (the tree attention mask)
* ``paths_to`` (T, D+1) node indices from the root down to each node, padded with the node itself
"""

from __future__ import annotations

from typing import Iterable, Sequence

import attrs
import torch

from propd.errors import PropdError


def _normalize_paths(paths: Iterable[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    uniq = {tuple(int(r) for r in p) for p in paths}
    uniq.discard(())
    for p in uniq:
        if any(r < 0 for r in p):
            raise PropdError(f"tree path {p} has a negative rank")
        if len(p) > 1 and p[:-1] not in uniq:
            raise PropdError(f"tree path {p} has no parent path {p[:-1]}: every prefix of a path must be a path")
    return tuple(sorted(uniq, key=lambda p: (len(p), p)))


def chain_paths(length: int) -> tuple[tuple[int, ...], ...]:
    """Paths of a chain of ``length`` top-1 guesses."""
    if length < 0:
        raise PropdError(f"chain length must be >= 0, got {length}")
    return tuple((0,) * d for d in range(1, length + 1))


@attrs.frozen(eq=False)
class DraftTree:
    """The shape of a token tree (topology and head ranks), with its device tensors."""

    paths: tuple[tuple[int, ...], ...]
    parents: torch.Tensor
    depths: torch.Tensor
    ranks: torch.Tensor
    mask: torch.Tensor
    paths_to: torch.Tensor
    internal: torch.Tensor  # (I,) nodes that have children, ascending
    parent_slot: torch.Tensor  # (T,) index in ``internal`` of each node's parent (0 for the root)
    max_depth: int
    max_rank: int

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1

    @classmethod
    def from_paths(cls, paths: Iterable[Sequence[int]], device: torch.device | str = "cpu") -> "DraftTree":
        paths = _normalize_paths(paths)
        index = {(): 0}
        for i, p in enumerate(paths, start=1):
            index[p] = i
        n = len(paths) + 1
        parents = [-1] + [index[p[:-1]] for p in paths]
        depths = [0] + [len(p) for p in paths]
        ranks = [0] + [p[-1] for p in paths]
        max_depth = max(depths)
        mask = torch.zeros(n, n, dtype=torch.bool)
        paths_to = torch.zeros(n, max_depth + 1, dtype=torch.long)
        for i, p in enumerate(((),) + paths):
            chain = [index[p[:k]] for k in range(len(p) + 1)]  # root .. node
            mask[i, chain] = True
            paths_to[i] = torch.tensor(chain + [i] * (max_depth + 1 - len(chain)))
        internal = sorted(set(parents[1:]))
        slot = {n: i for i, n in enumerate(internal)}
        parent_slot = [0] + [slot[p] for p in parents[1:]]
        dev = torch.device(device)
        return cls(
            paths=paths,
            parents=torch.tensor(parents, dtype=torch.long, device=dev),
            depths=torch.tensor(depths, dtype=torch.long, device=dev),
            ranks=torch.tensor(ranks, dtype=torch.long, device=dev),
            mask=mask.to(dev),
            paths_to=paths_to.to(dev),
            internal=torch.tensor(internal, dtype=torch.long, device=dev),
            parent_slot=torch.tensor(parent_slot, dtype=torch.long, device=dev),
            max_depth=max_depth,
            max_rank=max(ranks) if paths else 0,
        )

    @classmethod
    def chain(cls, length: int, device: torch.device | str = "cpu") -> "DraftTree":
        """A chain of ``length`` guessed tokens (top-1 of each head): BPD (Stern et al. 2018)."""
        return cls.from_paths(chain_paths(length), device=device)

    def keep_closure(self, keep: torch.Tensor) -> torch.Tensor:
        """Close a (B, T) keep-mask under ancestry: a node survives only if it and all its ancestors do.

        The root always survives. One matmul, no host sync.
        """
        keep = keep.clone()
        keep[:, 0] = True
        dropped = (~keep).to(torch.float32)  # (B, T)
        # a node is dropped if any node on its root path is dropped
        bad = dropped @ self.mask.to(torch.float32).T  # (B, T)
        return bad == 0


def survivors(keep: torch.Tensor, pad_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact a (B, T) keep-mask into padded survivor indices.

    Returns ``(node_idx, valid)``, both (B, T') with T' = the largest survivor count in the batch: the kept node
    indices of each row in ascending (topological) order, padded with ``pad_index``, and which entries are real.
    """
    counts = keep.sum(dim=1)  # (B,)
    width = int(counts.max())  # one host sync; needed for the shape
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept first, in order
    valid = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
    node_idx = torch.where(valid, order, torch.full_like(order, pad_index))
    return node_idx, valid


def survivor_mask(node_idx: torch.Tensor, valid: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """The inverse of :func:`survivors`: a (B, T) mask of the nodes present in the row layout ``node_idx``."""
    alive = torch.zeros(node_idx.shape[0], num_nodes + 1, dtype=torch.bool, device=node_idx.device)
    alive.scatter_(1, node_idx, valid)  # padding entries (index num_nodes) land in the spare column
    return alive[:, :num_nodes]


def positions_of(node_idx: torch.Tensor, wanted: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Where each node of ``wanted`` (B, W) sits in the row layout ``node_idx`` (B, T') of surviving nodes.

    Entries of ``node_idx`` equal to ``num_nodes`` are padding; asking for a node that is not in the layout gives an
    arbitrary position, so ask only for survivors.
    """
    inv = torch.zeros(node_idx.shape[0], num_nodes + 1, dtype=torch.long, device=node_idx.device)
    inv.scatter_(1, node_idx, torch.arange(node_idx.shape[1], device=node_idx.device).expand_as(node_idx))
    return inv.gather(1, wanted)
