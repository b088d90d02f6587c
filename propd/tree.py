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

import heapq
import sys
from typing import Iterable, Sequence

import attrs
import torch

from propd.errors import PropdError


def normalize_paths(paths: Iterable[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """Distinct paths in breadth-first order (by depth, then ranks), each path's parent before it; checked."""
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
    _rows: dict = attrs.field(factory=dict, repr=False)  # batch size -> RowTrees views (as_rows)

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1

    @classmethod
    def from_paths(cls, paths: Iterable[Sequence[int]], device: torch.device | str = "cpu") -> "DraftTree":
        paths = normalize_paths(paths)
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


def survivors(keep: torch.Tensor, pad_index: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact a (B, T) keep-mask into padded survivor indices.

    Returns ``(node_idx, valid)``, both (B, T') with T' = the largest survivor count in the batch, or ``width`` when
    given (static shapes: no host sync; T' >= the largest count is assumed): the kept node indices of each row in
    ascending (topological) order, padded with ``pad_index``, and which entries are real.
    """
    counts = keep.sum(dim=1)  # (B,)
    if width is None:
        width = int(counts.max())  # one host sync; needed for the shape
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept first, in order
    if order.shape[1] < width:
        order = torch.nn.functional.pad(order, (0, width - order.shape[1]), value=pad_index)
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


@attrs.frozen(eq=False)
class RowTrees:
    """Token trees with one topology per batch row (EAGLE-2's per-row trees, lookup matches that differ per row).

    Node 0 of every row is its root; nodes are in topological order (``parents[b, i] < i``). A row with fewer real
    nodes than the widest row pads with nodes that the draft marks absent (``Draft.present``); they may hang anywhere.

    * ``parents``  (B, T)      parent index, -1 for the root
    * ``depths``   (B, T)      0 for the root
    * ``mask``     (B, T, T)   ``mask[b, i, j]``: j is i or an ancestor of i in row b (the tree attention mask)
    * ``paths_to`` (B, T, D+1) node indices from the root down to each node, padded with the node itself
    * ``shared``   the :class:`DraftTree` all rows share, when they do (then the tensors are expanded views of it)
    """

    parents: torch.Tensor
    depths: torch.Tensor
    mask: torch.Tensor
    paths_to: torch.Tensor
    max_depth: int
    shared: DraftTree | None = None

    @property
    def num_nodes(self) -> int:
        return self.parents.shape[1]

    @property
    def batch_size(self) -> int:
        return self.parents.shape[0]

    @classmethod
    def from_parents(cls, parents: torch.Tensor, max_depth: int | None = None) -> "RowTrees":
        """Per-row trees from parent indices (B, T), on their device: the ancestor mask by repeated squaring of the
        parent relation (log2 T boolean products, no host loop), the depths from it, and one host sync for the
        depth (the width of ``paths_to``) and the checks, unless ``max_depth`` is given (then nothing is checked)."""
        parents = parents.long()
        B, T = parents.shape
        if max_depth is not None and parents.device.type == "cpu" and B * T * T <= cls.HOST_CELLS:
            host = cls._from_host_parents(parents, max_depth)
            if host is not None:
                return host
        idx = torch.arange(T, device=parents.device)
        if max_depth is None:
            if T == 0 or bool((parents[:, 0] != -1).any()):
                raise PropdError("every row's node 0 must be its root (parent -1)")
            if bool(((parents[:, 1:] < 0) | (parents[:, 1:] >= idx[1:])).any()):
                raise PropdError("tree nodes must come after their parents (0 <= parents[b, i] < i for i >= 1)")
        eye = torch.eye(T, dtype=torch.float32, device=parents.device).expand(B, T, T)
        up = torch.zeros(B, T, T, dtype=torch.float32, device=parents.device)
        up.scatter_(2, parents.clamp(min=0)[..., None], 1.0)
        up[:, 0, 0] = 0.0
        mask = ((eye + up) > 0).float()  # reach within 1 step; squaring doubles the reach
        for _ in range(max(1, (T - 1).bit_length())):
            mask = (torch.bmm(mask, mask) > 0).float()
        mask = mask > 0
        depths = mask.sum(dim=2) - 1
        D = int(depths.max()) if max_depth is None else max_depth
        paths_to = idx.expand(B, T)[..., None].repeat(1, 1, D + 1)  # padded with the node itself
        slot = torch.where(mask, depths[:, None, :], D + 1)  # (B, T, T): ancestor j's depth, D+1 if not an ancestor
        spill = torch.cat([paths_to, paths_to[..., :1]], dim=2)  # a spare column takes the non-ancestors
        spill.scatter_(2, slot, idx.expand(B, T, T).contiguous())  # ancestor j of i lands at column depth(j)
        paths_to = spill[..., : D + 1]
        return cls(parents=parents, depths=depths, mask=mask, paths_to=paths_to, max_depth=D)

    # small trees on the CPU: the same tensors from a walk down each row's parents, cheaper than a dozen tensor ops
    HOST_CELLS = 2048  # B * T * T
    NATIVE = True  # the walk by the CPU extension where it is loaded (False: in Python)

    @classmethod
    def _from_host_parents(cls, parents: torch.Tensor, D: int) -> "RowTrees | None":
        """:meth:`from_parents` with ``max_depth`` D for a CPU ``parents`` (B, T), by a walk: each node's ancestors
        and path from its parent's (node 0 the root), in the CPU extension (``row_trees``) where it is loaded, else in
        Python. None if some node does not come after its parent (then the tensor path gives its answer)."""
        from propd.models import cpu_kernel

        ext = cpu_kernel.loaded()
        if ext is not None and cls.NATIVE:  # the same walk in the CPU extension, where it is loaded anyway
            out = ext.row_trees(parents, D)
            return cls(parents=parents, depths=out[0], mask=out[1], paths_to=out[2], max_depth=D) if out else None
        T = parents.shape[1]
        masks, depths, paths = [], [], []
        for row in parents.tolist():
            anc = [[0]]  # per node: its ancestors and itself, root first (one per depth)
            for i, p in enumerate(row[1:], start=1):
                if not 0 <= p < i:
                    return None
                anc.append(anc[p] + [i])
            mask = [[False] * T for _ in range(T)]
            path = []
            for i, chain in enumerate(anc):  # ancestors root first, one per depth: column d holds the depth-d one
                for j in chain:
                    mask[i][j] = True
                path.append([chain[d] if d < len(chain) else i for d in range(D + 1)])
            masks.append(mask)
            depths.append([len(chain) - 1 for chain in anc])
            paths.append(path)
        return cls(parents=parents, depths=torch.tensor(depths, dtype=torch.long), mask=torch.tensor(masks),
                   paths_to=torch.tensor(paths, dtype=torch.long), max_depth=D)

    def keep_closure(self, keep: torch.Tensor) -> torch.Tensor:
        """As :meth:`DraftTree.keep_closure`, per row."""
        if self.shared is not None:
            return self.shared.keep_closure(keep)
        keep = keep.clone()
        keep[:, 0] = True
        dropped = (~keep).to(torch.float32)[..., None]  # (B, T, 1)
        return torch.bmm(self.mask.to(torch.float32), dropped)[..., 0] == 0

    def depth_at(self, node: torch.Tensor) -> torch.Tensor:
        """Depth (B,) of one node (B,) per row."""
        return self.depths.gather(1, node[:, None])[:, 0]

    def path_to(self, node: torch.Tensor) -> torch.Tensor:
        """Node indices (B, D+1) from the root down to one node (B,) per row, padded with that node."""
        return self.paths_to.gather(1, node[:, None, None].expand(-1, 1, self.max_depth + 1))[:, 0]

    def sibling_ranks(self) -> torch.Tensor:
        """Each node's rank among its siblings (B, T), in node order (the root: 0): the proposer's preference order."""
        if self.shared is not None:
            return self.shared.ranks.expand(self.batch_size, -1)
        same = self.parents[:, :, None] == self.parents[:, None, :]  # (B, T, T)
        earlier = torch.ones(self.num_nodes, self.num_nodes, dtype=torch.bool, device=self.parents.device).tril(-1)
        return (same & earlier).sum(dim=2)


def as_rows(tree: "DraftTree | RowTrees", batch: int) -> RowTrees:
    """Any tree as per-row tensors: a shared :class:`DraftTree` becomes expanded views (no copies)."""
    if isinstance(tree, RowTrees):
        return tree
    cached = tree._rows.get(batch)
    if cached is None:
        B = batch
        cached = tree._rows[batch] = RowTrees(
            parents=tree.parents.expand(B, -1), depths=tree.depths.expand(B, -1), mask=tree.mask.expand(B, -1, -1),
            paths_to=tree.paths_to.expand(B, -1, -1), max_depth=tree.max_depth, shared=tree)
    return cached


class TrieRows:
    """Builds per-row token tries on the host, for proposers whose candidates are token sequences (lookup matches,
    several proposers' drafts merged): a node per distinct (parent, token), at most ``budget`` nodes per row (the
    root included), in insertion order, so parents come before their children. :meth:`draft` turns them into a
    :class:`propd.types.Draft` with per-row trees and absent padding nodes.
    """

    def __init__(self, roots: list[int], budget: int):
        self.budget = budget
        self.tokens = [[r] for r in roots]
        self.parents = [[-1] for _ in roots]
        self.depths = [[0] for _ in roots]
        self.depth = 0  # deepest node of any row
        self._index = [{} for _ in roots]  # per row: (parent, token) -> node

    def add(self, row: int, parent: int, token: int) -> int | None:
        """The node for ``token`` under ``parent`` in ``row`` (created if needed); None when the row is full."""
        key = (parent, token)
        node = self._index[row].get(key)
        if node is None:
            if len(self.tokens[row]) >= self.budget:
                return None
            node = self._index[row][key] = len(self.tokens[row])
            self.tokens[row].append(token)
            self.parents[row].append(parent)
            self.depths[row].append(self.depths[row][parent] + 1)
            self.depth = max(self.depth, self.depths[row][-1])
        return node

    def add_sequence(self, row: int, seq: list[int], parent: int = 0) -> None:
        """Add a chain of tokens below ``parent`` (default: the root), as far as the budget allows."""
        for t in seq:
            parent = self.add(row, parent, t)
            if parent is None:
                return

    @property
    def width(self) -> int:
        return max(len(t) for t in self.tokens)

    def draft(self, device: torch.device | str):
        """The tries as a Draft: tokens (B, T), RowTrees, and ``present`` (B, T) marking each row's real nodes."""
        from propd.types import Draft

        T = self.width
        tokens = [t + [t[0]] * (T - len(t)) for t in self.tokens]
        parents = [p + [0] * (T - len(p)) for p in self.parents]
        present = [[True] * len(p) + [False] * (T - len(p)) for p in self.parents]
        dev = torch.device(device)
        return Draft(tokens=torch.tensor(tokens, dtype=torch.long, device=dev),
                     tree=RowTrees.from_parents(torch.tensor(parents, dtype=torch.long, device=dev),
                                                max_depth=self.depth),  # a trie is well formed: no checks, no sync
                     present=torch.tensor(present, dtype=torch.bool, device=dev))


# ---------------------------------------------------------------------------------------------- named shapes

# Named tree shapes for the static sizer.
# 
# ``mc_sim_7b_63``: the 63-node tree Medusa ships as its default for Vicuna-7B (Cai et al. 2023; Medusa repository,
# ``medusa/model/medusa_choices.py``), found there by simulating acceptance with measured per-head accuracies. Depth 4,
# top-10 guesses per head.

MC_SIM_7B_63 = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4), (2, 0), (0, 5),
    (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8), (0, 0, 2), (3, 0), (0, 9), (8,), (9,),
    (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1),
    (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0),
    (0, 1, 2), (2, 0, 0), (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0),
    (0, 0, 0, 1), (1, 6), (0, 7, 0),
)

NAMED_TREES = {"mc_sim_7b_63": MC_SIM_7B_63}


def tree_paths(spec: str | list | tuple) -> tuple[tuple[int, ...], ...]:
    """Paths for a tree spec: a name in NAMED_TREES, ``chain:N`` (N top-1 guesses), ``budget:N:D`` (N nodes, D deep:
    a budget for proposers that shape their own trees, such as ``eagle``), or an explicit path list."""
    if isinstance(spec, (list, tuple)):
        return tuple(tuple(int(r) for r in p) for p in spec)
    if spec in NAMED_TREES:
        return NAMED_TREES[spec]
    if isinstance(spec, str) and spec.startswith("budget:"):
        try:
            n, d = (int(x) for x in spec.split(":")[1:])
        except ValueError:
            n = d = -1
        if n < 1 or d < 0 or (n > 1 and not 1 <= d <= n - 1) or (n == 1 and d != 0):
            raise PropdError(f"bad budget tree {spec!r}: use budget:N:D, N nodes (root included) at most D deep, "
                             "1 <= D < N")
        return chain_paths(d) + tuple((r,) for r in range(1, n - d))
    if isinstance(spec, str) and spec.startswith("chain:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            n = -1
        if n < 0:
            raise PropdError(f"bad chain tree {spec!r}: use chain:N with N >= 0")
        return chain_paths(n)
    raise PropdError(f"unknown tree {spec!r} (known: {', '.join(NAMED_TREES)}, chain:N, or a list of paths)")


# ---------------------------------------------------------------------------------------------- best trees

# Best token trees from per-head, per-rank acceptance probabilities.
# 
# With ``p[d][r]`` the probability that head d's rank-r guess is the right token (given the path so far was right), a
# node reached by ranks (r_1..r_d) is accepted with probability prod_j p[j-1][r_j] (the heads are treated as
# independent, as in Medusa's tree search, Cai et al. 2023, sec. 3.3.1, and ProPD's l(i), Zhong et al. 2024, sec. 4.2).
# The expected number of accepted tokens of a tree is the sum of its nodes' values; since a child's value never
# exceeds its parent's, taking nodes greedily by value (a best-first search) yields, for every size, a connected tree
# of maximal expected acceptance, and all sizes come out of one search.

def best_tree(p: Sequence[Sequence[float]], size: int) -> tuple[list[tuple[int, ...]], list[float]]:
    """The ``size - 1`` most valuable paths (the root is free) and their values, in the order they were chosen."""
    search = BestTrees(p)
    return search.paths[: size - 1], search.values[: size - 1]


class BestTrees:
    """:func:`best_tree`'s search, run only as far as it is read: ``paths[:n]`` and ``values[:n]`` (slices from 0)
    continue the search to n paths, which are ``best_tree(p, n + 1)``'s. A best-first search pops nodes in a fixed
    order, so a longer search begins with a shorter one's paths. A sizer that prices a few small sizes every step
    then pays for those, not for its largest candidate."""

    def __init__(self, p: Sequence[Sequence[float]]):
        self._p = p
        self._found: tuple[list[tuple[int, ...]], list[float]] = ([], [])
        self._heap = [(-p[0][r], (r,)) for r in range(len(p[0]))] if p else []
        heapq.heapify(self._heap)
        self.paths = _SearchedPrefix(self, 0)
        self.values = _SearchedPrefix(self, 1)

    def extend(self, n: int) -> None:
        """Pop nodes until ``n`` paths are found or the tree is whole."""
        p, heap = self._p, self._heap
        paths, values = self._found
        depth, ranks = len(p), len(p[0]) if p else 0
        while heap and len(paths) < n:
            neg, path = heapq.heappop(heap)
            paths.append(path)
            values.append(-neg)
            if len(path) < depth:
                row = p[len(path)]
                for r in range(ranks):
                    heapq.heappush(heap, (neg * row[r], path + (r,)))


class _SearchedPrefix:
    """``BestTrees.paths`` or ``.values``: sliced from 0 (``[:n]``), a list of the first n, searched on demand."""

    def __init__(self, search: BestTrees, which: int):
        self._search, self._which = search, which

    def __getitem__(self, key: slice) -> list:
        if not isinstance(key, slice) or key.start not in (None, 0) or key.step not in (None, 1):
            raise TypeError("read a best-tree search as [:n]")
        n = key.stop if key.stop is not None else sys.maxsize
        self._search.extend(n)
        return self._search._found[self._which][:max(n, 0)]


def rank_probabilities(topk_curve: Sequence[Sequence[float]]) -> list[list[float]]:
    """Per-rank probabilities from cumulative top-k accuracies (``curve[d][k]`` = P(right token in top k+1))."""
    out = []
    for curve in topk_curve:
        prev, row = 0.0, []
        for c in curve:
            row.append(max(c - prev, 0.0))
            prev = max(prev, c)
        out.append(row)
    return out


class TreeCache:
    """Trees by (paths, device), built once: sizers return the same few shapes step after step."""

    def __init__(self):
        self._trees: dict[tuple, DraftTree] = {}

    def get(self, paths: list[tuple[int, ...]], device) -> DraftTree:
        key = (tuple(paths), str(device))
        tree = self._trees.get(key)
        if tree is None:
            if len(self._trees) > 256:
                self._trees.clear()
            tree = self._trees[key] = DraftTree.from_paths(paths, device=device)
        return tree
