"""The four roles as typed protocols: what a component of each role implements, with shapes.

B live rows, T draft nodes, T' live nodes, H hidden size, V vocabulary. Each method is a pluggy hook implementation
(decorate it with ``@propd.hookimpl``) and may take any subset of the arguments named here (see
:mod:`propd.hookspecs`). Every role may also implement ``propd_setup``, ``propd_rows_begin``, ``propd_rows_join``,
``propd_rows_leave`` and ``propd_after_step``. :func:`propd.plugins.step_manager` checks a component against its
role's protocol when a Decoder is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from propd.tree import DraftTree
    from propd.types import Acceptance, Draft, LiveNodes, StepContext


@runtime_checkable
class Sizer(Protocol):
    def propd_tree(self, ctx: "StepContext") -> "DraftTree":
        """The step's budget: at most ``num_nodes`` nodes per row (the root included), a suggested shape."""


@runtime_checkable
class Proposer(Protocol):
    def propd_propose(self, ctx: "StepContext", tree: "DraftTree") -> "Draft | torch.Tensor":
        """A Draft within the budget (tokens (B, T), a shared or per-row tree), or tokens (B, T) for ``tree``."""


@runtime_checkable
class Pruner(Protocol):
    def propd_prune_layer(self) -> int:
        """The layer n (1 <= n < L) after which :meth:`propd_prune` runs."""

    def propd_prune(self, ctx: "StepContext", draft: "Draft", nodes: "LiveNodes",
                    hidden: "torch.Tensor") -> "torch.Tensor | None":
        """A (B, T) bool keep-mask from the live nodes' hidden states (B, T', H) after n layers, or None."""


@runtime_checkable
class Verifier(Protocol):
    def propd_verify(self, ctx: "StepContext", draft: "Draft", nodes: "LiveNodes",
                     logits: "torch.Tensor") -> "Acceptance":
        """The accepted path's deepest node, its depth and the bonus token, each (B,) int64, from the live nodes'
        logits (B, T', V)."""


PROTOCOLS = {"sizer": Sizer, "proposer": Proposer, "pruner": Pruner, "verifier": Verifier}


def missing_hooks(role: str, obj: object) -> list[str]:
    """The hooks of ``role``'s protocol that ``obj`` does not implement (empty when it fits)."""
    proto = PROTOCOLS[role]
    if isinstance(obj, proto):
        return []
    names = [n for n in vars(proto) if n.startswith("propd_")]
    return [n for n in names if not callable(getattr(obj, n, None))]


LIFECYCLE_HOOKS = ("propd_setup", "propd_rows_begin", "propd_rows_join", "propd_rows_leave", "propd_after_step")


def observer_problem(obj: object) -> str | None:
    """Why ``obj`` cannot be an observer (``Decoder(observers=...)``), or None: an observer implements one or more
    lifecycle hooks and no role's hooks (it must not change the decoding)."""
    hooks = {n for n in dir(obj) if n.startswith("propd_") and hasattr(getattr(obj, n, None), "propd_impl")}
    if not hooks & set(LIFECYCLE_HOOKS) or hooks - set(LIFECYCLE_HOOKS):
        return (f"observer {type(obj).__name__} must implement one or more of {', '.join(LIFECYCLE_HOOKS)} "
                f"(with @propd.hookimpl) and no other hook; it has {', '.join(sorted(hooks)) or 'none'}")
    return None
