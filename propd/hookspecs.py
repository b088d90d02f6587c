"""The hook specifications: one hook per role of a decoding step, plus registration and lifecycle hooks.

A step runs: TreeSizer -> Proposer -> model layers 0..n-1 -> Pruner(s) -> layers n..L-1 -> Verifier -> commit ->
after-step. Components implement the hooks of their role with ``@propd.hookimpl``; the decoder calls them through
its own ``pluggy.PluginManager`` and never looks at a component's name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    import torch

    from propd.tree import DraftTree
    from propd.types import Acceptance, StepContext, StepStats

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


# ---------------------------------------------------------------------------------------------- lifecycle


@hookspec
def propd_setup(model: Any) -> None:
    """Called once when a Decoder is built, with the :class:`propd.models.loading.LoadedModel`.

    Check what the component needs (heads, early heads) and raise :class:`propd.PropdError` with a one-line
    reason when it is missing. Every registered component may implement it.
    """


# ---------------------------------------------------------------------------------------------- TreeSizer


@hookspec(firstresult=True)
def propd_tree(ctx: "StepContext") -> "DraftTree":
    """TreeSizer: the tree shape for this step (shared by all rows). A 1-node tree is a plain AR step.

    firstresult; exactly one sizer is registered.
    """


# ---------------------------------------------------------------------------------------------- Proposer


@hookspec(firstresult=True)
def propd_propose(ctx: "StepContext", tree: "DraftTree") -> "torch.Tensor":
    """Proposer: candidate tokens (B, T) for every node of ``tree``; column 0 must be ``ctx.roots``.

    firstresult; at most one proposer is registered, and one is needed for trees of more than one node.
    """


# ---------------------------------------------------------------------------------------------- Pruner


@hookspec
def propd_prune_layer() -> int:
    """Pruner: the number of layers n after which this pruner acts (1 <= n < L)."""


@hookspec
def propd_prune(ctx: "StepContext", tree: "DraftTree", tokens: "torch.Tensor", layer: int,
                hidden: "torch.Tensor", node_idx: "torch.Tensor", valid: "torch.Tensor") -> "torch.Tensor | None":
    """Pruner: a keep-mask (B, T) over all tree nodes after ``layer`` layers, or None when not acting here.

    ``hidden`` (B, T', H) are the hidden states of the live nodes ``node_idx`` (B, T') (entries where ``valid`` is
    False are padding). Several pruners stack: a node survives if every pruner keeps it; the decoder then drops
    every node whose parent was dropped and never drops the root, so pruning only changes the work, not the output.
    """


# ---------------------------------------------------------------------------------------------- Verifier


@hookspec(firstresult=True)
def propd_verify(ctx: "StepContext", tree: "DraftTree", tokens: "torch.Tensor", logits: "torch.Tensor",
                 node_idx: "torch.Tensor", valid: "torch.Tensor") -> "Acceptance":
    """Verifier: the accepted path and bonus token of every row.

    ``logits`` (B, T', V) belong to the surviving nodes ``node_idx`` (B, T'). firstresult; exactly one verifier.
    """


# ---------------------------------------------------------------------------------------------- after a step


@hookspec
def propd_after_step(ctx: "StepContext", tree: "DraftTree", acceptance: "Acceptance", stats: "StepStats",
                     tokens: "torch.Tensor") -> None:
    """Learn from a finished step: the proposed ``tokens`` (B, T), what was accepted, how many nodes ran, how long
    the step took (``stats.step_time_s``, wall clock, pruning included)."""
