"""The contracts between the decoder and its strategies."""

from __future__ import annotations

from typing import Any, Callable

import attrs
import torch


@attrs.frozen(eq=False)
class StepContext:
    """What a strategy may know about the current step. Tensors have one row per live batch row."""

    step: int
    row_ids: tuple[int, ...]  # index of each live row's prompt in the generate() call
    lengths: torch.Tensor  # (B,) tokens committed in the KV cache
    host_lengths: tuple[int, ...]
    num_generated: tuple[int, ...]  # tokens generated so far per row (the root included)
    roots: torch.Tensor  # (B,) the last verified token of each row, not yet in the cache
    last_hidden: torch.Tensor  # (B, H) final normed hidden state that produced ``roots``
    heads: Callable[[torch.Tensor], torch.Tensor] | None  # hidden (B, H) -> Medusa head logits (B, K, V)
    early_heads: dict[int, Callable[[torch.Tensor], torch.Tensor]]  # layer n -> hidden (.., H) -> logits (.., V)
    vocab_size: int
    device: torch.device
    draft_vocab: int | None = None  # the Medusa heads guess among this many frequent tokens (MedusaHeads.topk)
    _memo: dict = attrs.field(factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.row_ids)

    def head_logits(self) -> torch.Tensor:
        """Logits (B, K, V) of the K Medusa heads on ``last_hidden``, computed at most once per step and shared by
        every strategy that asks (the heads' vocabulary projection is a large part of a small model's step)."""
        if self.heads is None:
            raise ValueError("no Medusa heads are loaded")
        logits = self._memo.get("head_logits")
        if logits is None:
            logits = self._memo["head_logits"] = self.heads(self.last_hidden)
        return logits

    def head_topk(self, k: int) -> torch.Tensor:
        """Token ids (B, K, k) of each Medusa head's k most likely guesses (best first), computed at most once per
        step; heads with a draft vocabulary guess within it (``MedusaHeads.topk`` and ``draft_vocab``)."""
        have = self._memo.get("head_topk")
        if have is None or have.shape[-1] < k:
            want = max(k, 16)  # one top-k serves all callers
            topk = getattr(self.heads, "topk", None)  # MedusaHeads: within the draft vocabulary, if any
            # (without heads, head_logits below raises)
            if topk is not None:
                have = topk(self.last_hidden, want, draft_vocab=self.draft_vocab)
            else:
                logits = self.head_logits()
                have = logits.topk(min(want, logits.shape[-1]), dim=-1).indices
            self._memo["head_topk"] = have
        return have[..., :k]

    def heads_computed(self) -> bool:
        """Whether some strategy already paid for the heads this step."""
        return "head_logits" in self._memo or "head_topk" in self._memo


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
    row_wall_time_s: list[float] = attrs.Factory(list)  # per prompt: from its batch's start until it finished
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
