"""The contracts between the decoder and its strategies."""

from __future__ import annotations

from typing import Any

import attrs
import torch


@attrs.frozen(eq=False)
class StepContext:
    """What a strategy may know about the current step. Tensors have one row per live batch row, on ``device``.

    Nothing here belongs to one strategy: a component keeps its own state (a proposer's head outputs, a drafter's KV
    cache) and learns from the hooks' arguments, never from another component.
    """

    step: int
    row_ids: tuple[int, ...]  # index of each live row's prompt in the generate() call
    lengths: torch.Tensor  # (B,) tokens committed in the KV cache
    host_lengths: tuple[int, ...]
    num_generated: tuple[int, ...]  # tokens generated so far per row (the root included)
    roots: torch.Tensor  # (B,) the last verified token of each row, not yet in the cache
    last_hidden: torch.Tensor  # (B, H) final normed hidden state that produced ``roots``
    vocab_size: int
    device: torch.device
    # (B, C) int64: each row's prompt and generated ids, the root last, at 0 .. lengths[b]; zeros past them.
    # Kept on the device and appended at each commit (C grows with the cache).
    history: torch.Tensor | None = None
    # (B, A, H): final normed hidden states of the tokens the previous step committed, root first (EAGLE's
    # ``update_inference_inputs``); ``accepted_counts`` (B,) of them are real, and the last real one is
    # ``last_hidden``. At step 0 the previous "step" is the prefill: A = 1, the last prompt token (the whole prompt's
    # states go to ``propd_rows_begin``).
    accepted_hidden: torch.Tensor | None = None
    accepted_counts: torch.Tensor | None = None
    # the call's sampling settings (None or temperature 0: greedy) and each live row's generator (propd.sampling)
    sampling: Any = None
    generators: tuple = ()

    @property
    def batch_size(self) -> int:
        return len(self.row_ids)

    @property
    def history_lengths(self) -> torch.Tensor:
        """(B,) ids in ``history`` per row: the committed tokens and the root."""
        return self.lengths + 1


@attrs.frozen(eq=False)
class RowsBegin:
    """Rows that start decoding (``propd_rows_begin``): their prefill is done and their first token chosen."""

    row_ids: tuple[int, ...]  # prompt index of each row, in batch order
    prompt_ids: torch.Tensor  # (B, P) the prompts, padded with 0 past ``prompt_lengths``
    prompt_lengths: torch.Tensor  # (B,)
    hidden: torch.Tensor  # (B, P, H) final normed hidden state of every prompt position (padding past the lengths)
    roots: torch.Tensor  # (B,) the first generated token of each row


@attrs.frozen(eq=False)
class Draft:
    """A proposer's draft for one step (``propd_propose``): a token tree per row, and what the proposer believes.

    * ``tokens`` (B, T) int64: a token per node; column 0 is ``ctx.roots``.
    * ``tree``: the topology, one :class:`propd.tree.DraftTree` shared by all rows or a :class:`propd.tree.RowTrees`
      with per-row parents; T may be below the sizer's budget (a 1-node draft is a plain AR step), never above it.
    * ``present`` (B, T) bool, optional: nodes that exist in each row (a row with fewer nodes pads with absent ones;
      they cost no layer work and are never accepted). Node 0 is always present.
    * ``probs`` (B, T), optional: the draft's probability of each node's token given its parent (root: 1).
    * ``dists`` (B, T, V), optional: the draft distribution over the vocabulary at each node, from which its
      children were drawn (speculative sampling needs these; Leviathan et al. 2023, Miao et al. 2024).
    * ``confidence`` (B, T), optional: the proposer's estimate that each node is accepted (path probability).

    Sizers learn from drafts and their outcomes in ``propd_after_step``; what a path means (Medusa's "rank of head d's
    guess", a lookup match) stays the proposer's business. Sibling order is the proposer's preference order.
    """

    tokens: torch.Tensor
    tree: Any  # DraftTree | RowTrees
    present: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    dists: torch.Tensor | None = None
    confidence: torch.Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    @property
    def rows(self):
        """The tree as per-row tensors (:class:`propd.tree.RowTrees`; views for a shared tree)."""
        from propd.tree import as_rows

        return as_rows(self.tree, self.tokens.shape[0])


@attrs.frozen(eq=False)
class LiveNodes:
    """The tree nodes a forward pass is running, per row: the survivors of pruning, compacted to the left.

    ``node_idx`` (B, T') tree indices in ascending order, padded with ``num_nodes`` where ``valid`` (B, T') is False.
    Tensors the step computes for live nodes (hidden states, logits) are laid out like ``node_idx``.
    """

    node_idx: torch.Tensor
    valid: torch.Tensor
    num_nodes: int

    def alive(self) -> torch.Tensor:
        """(B, T) bool: which tree nodes are live."""
        from propd.tree import survivor_mask

        return survivor_mask(self.node_idx, self.valid, self.num_nodes)

    def position(self, nodes: torch.Tensor) -> torch.Tensor:
        """Where tree nodes ``nodes`` (B, W) sit in the live layout (B, W); only meaningful for live nodes."""
        from propd.tree import positions_of

        return positions_of(self.node_idx, nodes, self.num_nodes)

    def gather(self, x: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` (B, T', ...) laid out like the live nodes, for tree nodes ``nodes`` (B, W): (B, W, ...)."""
        pos = self.position(nodes)
        return x.gather(1, pos.view(*pos.shape, *([1] * (x.dim() - 2))).expand(*pos.shape, *x.shape[2:]))


@attrs.frozen(eq=False)
class Acceptance:
    """A verifier's decision for every row."""

    best: torch.Tensor  # (B,) the deepest accepted node
    accept_len: torch.Tensor  # (B,) accepted guessed tokens (0 .. tree depth), the root and bonus not counted
    bonus: torch.Tensor  # (B,) the token that follows the accepted path


@attrs.frozen
class StepStats:
    """Per-step record, in ``GenerationResult.stats``."""

    step: int
    batch_size: int
    row_ids: tuple[int, ...]  # prompt index of each live row, in the order of ``accepted``
    context_len: int  # longest committed length in the batch when the step began
    tree_nodes: int  # nodes per row before pruning
    nodes_after_pruning: float  # mean surviving nodes per row
    accepted: tuple[int, ...]  # tokens gained per row this step (accepted guesses + bonus)
    step_time_s: float
    draft_time_s: float = 0.0  # of step_time_s, in the proposer (its draft and the decoder's check of it)
    threads: int = 0  # CPU threads the step ran with (the thread tuner's choice); 0 on other devices

    @property
    def prune_rate(self) -> float:
        return 1.0 - self.nodes_after_pruning / self.tree_nodes

    def as_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["accepted"] = list(self.accepted)
        d["row_ids"] = list(self.row_ids)
        return d


@attrs.frozen
class GenerationResult:
    """What :meth:`propd.Decoder.generate` returns: per prompt, plus per-step statistics."""

    texts: list[str]
    token_ids: list[list[int]]  # generated ids only; ends with EOS when generation stopped on it
    steps: list[int]  # forward passes per prompt, the prefill included (it yields the first token)
    wall_time_s: float
    stats: list[StepStats]
    row_wall_time_s: list[float] = attrs.Factory(list)  # per prompt: from its prefill's start to its end
    accept_lengths: list[list[int]] = attrs.Factory(list)  # per prompt: tokens kept per forward pass (prefill first)

    @property
    def new_tokens(self) -> list[int]:
        return [len(t) for t in self.token_ids]

    def row_stats(self, i: int) -> list[dict[str, Any]]:
        """Prompt i's view of the steps it took part in: tree size, surviving nodes (batch mean), tokens it gained,
        step time, batch size and context length."""
        out = []
        for s in self.stats:
            if i in s.row_ids:
                out.append({"step": s.step, "tree_nodes": s.tree_nodes, "nodes_after_pruning": s.nodes_after_pruning,
                            "accepted": s.accepted[s.row_ids.index(i)], "step_time_s": round(s.step_time_s, 6),
                            "batch_size": s.batch_size, "context_len": s.context_len})
        return out

    def mean_accepted_tokens(self, i: int) -> float:
        """Tokens gained per forward pass for prompt i, the bonus token counted (AR = 1.0)."""
        return self.new_tokens[i] / max(self.steps[i], 1)
