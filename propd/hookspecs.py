"""The hook specifications: one hook per role of a decoding step, plus registration and lifecycle hooks.

A step runs: TreeSizer (a budget) -> Proposer (a draft) -> model layers 0..n-1 -> Pruner(s) -> layers n..L-1 ->
Verifier -> commit -> after-step; rows begin after their prefill and leave when finished. Shapes: B live rows, T draft
nodes, T' live nodes after pruning, H hidden size, V vocabulary. Components implement the hooks of their role with ``@propd.hookimpl``; the decoder calls them through
its own ``pluggy.PluginManager`` and never looks at a component's name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    import torch

    from propd.tree import DraftTree
    from propd.types import Acceptance, Draft, LiveNodes, RowsBegin, StepContext, StepStats

hookspec = pluggy.HookspecMarker("propd")
hookimpl = pluggy.HookimplMarker("propd")


# ---------------------------------------------------------------------------------------------- registration


@hookspec
def propd_register_components(register: Callable[..., None]) -> None:
    """Register named components: ``register(role, name, factory, config_cls=None, description="")``.

    ``role`` is one of ``sizer``, ``proposer``, ``pruner``, ``verifier``. ``factory(config)`` returns an object
    implementing that role's hooks; ``config_cls`` is an attrs class whose fields are the component's options.
    Called on the registry manager (built-ins plus the ``propd`` entry-point group), never on a decoder's.
    """


@hookspec
def propd_register_presets(register: Callable[..., None]) -> None:
    """Register named combinations: ``register(name, description, sizer, proposer=None, pruners=(),
    verifier=("greedy", {}))``, each role a component name or ``(name, options)``. They appear in ``propd presets``
    and take ``--preset NAME`` like the built-in ones; a name may not shadow another preset."""


# ---------------------------------------------------------------------------------------------- lifecycle


@hookspec
def propd_setup(model: Any) -> None:
    """Called once when a Decoder is built, with the :class:`propd.models.loading.LoadedModel`.

    Take what the component needs from the model here and raise :class:`propd.PropdError` with a one-line reason
    when it is missing: ``model.heads`` (Medusa heads), ``model.early_heads`` (layer n -> a callable from hidden
    states after n layers (.., H) to next-token logits (.., V): the documented route to early-exit heads for pruners),
    ``model.config``, ``model.model`` (the forward: embeddings, ``lm_head``). Every registered component may
    implement it.
    """


@hookspec
def propd_rows_begin(rows: "RowsBegin") -> None:
    """Rows start decoding: their prompts ran (``rows.hidden``: every prompt position's final hidden state) and their
    first token is ``rows.roots``. Called once per batch, before its first step; a stateful drafter fills its own
    per-row state (EAGLE's draft KV cache) here."""


@hookspec
def propd_rows_join(rows: "RowsBegin") -> None:
    """Rows join a running batch (continuous batching: a prompt waiting takes the place of a row that finished):
    as in ``propd_rows_begin``, their prefill is done and their first token chosen, and they are appended after the
    rows already decoding, in ``rows.row_ids`` order. A component with per-row state (one that implements
    ``propd_rows_begin`` or ``propd_rows_leave``) implements this too, or sets ``rows_can_join = False``; while any
    such component lacks it, the decoder decodes waiting prompts in fixed batches instead."""


@hookspec
def propd_rows_leave(keep: list[int], left: tuple[int, ...]) -> None:
    """Rows leave the batch (finished): ``keep`` lists the batch positions that stay, in their new order; ``left``
    the prompt indices of the rows that left. Called before the next step (and with ``keep == []`` when the batch
    ends), so per-row state can drop the same rows the KV cache drops."""


# ---------------------------------------------------------------------------------------------- TreeSizer


@hookspec(firstresult=True)
def propd_tree(ctx: "StepContext") -> "DraftTree":
    """TreeSizer: this step's budget as a tree: its node count (the root included) and depth bound the draft, and
    its shape is a suggestion a proposer may follow (Medusa fills it) or not (a lookup builds its own chains).

    A 1-node tree is a plain AR step (no proposer runs). firstresult; exactly one sizer is registered.
    """


# ---------------------------------------------------------------------------------------------- Proposer


@hookspec(firstresult=True)
def propd_propose(ctx: "StepContext", tree: "DraftTree") -> "Draft | torch.Tensor":
    """Proposer: a :class:`propd.types.Draft` within the budget ``tree`` (at most ``tree.num_nodes`` nodes per row
    and ``tree.max_depth`` deep), or just tokens (B, T) for the nodes of ``tree`` itself. Column 0 must be
    ``ctx.roots``.

    firstresult; at most one proposer is registered, and one is needed for trees of more than one node.
    """


# ---------------------------------------------------------------------------------------------- Pruner


@hookspec
def propd_prune_layer() -> int:
    """Pruner: the number of layers n after which this pruner acts (1 <= n < L); it is called there only."""


@hookspec
def propd_prune(ctx: "StepContext", draft: "Draft", nodes: "LiveNodes", hidden: "torch.Tensor", layer: int,
                tree: Any, tokens: "torch.Tensor", node_idx: "torch.Tensor", valid: "torch.Tensor"
                ) -> "torch.Tensor | None":
    """Pruner: a keep-mask (B, T) over the draft's nodes after ``layer`` layers (its declared layer), or None.

    ``hidden`` (B, T', H) are the hidden states of the live ``nodes`` (``nodes.gather(hidden, ids)`` picks tree nodes'
    rows). Several pruners stack: a node survives if every pruner keeps it; the decoder then drops every node whose
    parent was dropped and never drops the root, so pruning only changes the work, not the output.
    ``tree``, ``tokens``, ``node_idx`` and ``valid`` are ``draft.tree``, ``draft.tokens``, ``nodes.node_idx`` and
    ``nodes.valid``.
    """


# ---------------------------------------------------------------------------------------------- Verifier


@hookspec(firstresult=True)
def propd_verify(ctx: "StepContext", draft: "Draft", nodes: "LiveNodes", logits: "torch.Tensor", tree: Any,
                 tokens: "torch.Tensor", node_idx: "torch.Tensor", valid: "torch.Tensor") -> "Acceptance":
    """Verifier: the accepted path and bonus token of every row.

    ``logits`` (B, T', V) belong to the live ``nodes``. The best node must be live and ``accept_len`` its depth.
    firstresult; exactly one verifier. A verifier whose class sets ``argmax_only = True`` reads only each node's
    argmax: in greedy decoding it may get logits that are exact only in that (0 at each node's argmax, the lowest id
    among equal maxima as ``torch.argmax``, and -inf elsewhere), which the model finds for a quarter of the
    ``lm_head``'s bytes (:mod:`propd.models.screen`).
    """


# ---------------------------------------------------------------------------------------------- after a step


@hookspec
def propd_after_step(ctx: "StepContext", draft: "Draft", acceptance: "Acceptance", stats: "StepStats",
                     tree: Any, tokens: "torch.Tensor", path_hidden: "torch.Tensor") -> None:
    """Learn from a finished step: the ``draft`` (a 1-node draft of the roots when the sizer chose a plain AR step and
    no proposer ran), what was accepted, how many nodes ran, how
    long the step took (``stats.step_time_s``, wall clock, pruning included). ``tree`` is the sizer's budget for this
    step and ``tokens`` the draft's tokens (the root alone for a 1-node step). ``path_hidden`` (B, D+1, H) are the
    final normed hidden states of this step's accepted path, root .. best node, padded with the best node's
    (``acceptance.accept_len + 1`` real per row): what the next step's ``ctx.accepted_hidden`` holds."""
