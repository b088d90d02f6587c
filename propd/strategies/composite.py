"""Proposer ``composite``: several proposers' drafts merged into one per-row token tree.

Each part drafts within the sizer's budget; their trees are merged as tries (a path two parts share is one path),
the parts taken in the order given, each part's nodes in its own order, until the budget is full. Put the most
precise part first: ``composite:parts=["prompt-lookup","medusa"]`` keeps a lookup match whole and fills the rest of
the budget with Medusa's guesses. Lossless like any draft: the verifier decides.
"""

from __future__ import annotations

import inspect

import attrs

from propd.errors import PropdError
from propd.hookspecs import hookimpl
from propd.tree import TrieRows


@attrs.frozen
class CompositeConfig:
    """``parts``: proposer names, each ``NAME`` or ``NAME:key=value,...`` (installed plugins' proposers included)."""

    parts: tuple[str, ...] = ("prompt-lookup", "medusa")


class CompositeProposer:
    def __init__(self, config: CompositeConfig):
        if len(config.parts) < 1:
            raise PropdError("composite needs at least one part: parts=[\"NAME\", ...]")
        self.cfg = config
        self.parts: list = []
        self.names: list[str] = []
        self.vocab_size = None

    def bind_registry(self, registry) -> None:
        """Build the parts from the registry of the Decoder that built this component (its plugins included)."""
        from propd.presets import parse_component

        self.parts, self.names = [], []
        for text in self.cfg.parts:
            name, options = parse_component(text)
            if name == "composite":
                raise PropdError("a composite proposer cannot contain another composite")
            self.parts.append(registry.get("proposer", name).build(options))
            self.names.append(name)

    @hookimpl
    def propd_setup(self, model):
        if not self.parts:
            from propd.plugins import Registry

            self.bind_registry(Registry())
        self.vocab_size = model.config.vocab_size
        for part in self.parts:
            if hasattr(part, "propd_setup"):
                part.propd_setup(model=model)

    @hookimpl
    def propd_rows_begin(self, rows):
        for part in self.parts:
            if hasattr(part, "propd_rows_begin"):
                part.propd_rows_begin(rows=rows)

    @hookimpl
    def propd_rows_leave(self, keep, left):
        for part in self.parts:
            if hasattr(part, "propd_rows_leave"):
                part.propd_rows_leave(keep=keep, left=left)

    @hookimpl
    def propd_after_step(self, ctx, draft, acceptance, stats, tree, tokens):
        kw = dict(ctx=ctx, draft=draft, acceptance=acceptance, stats=stats, tree=tree, tokens=tokens)
        for part in self.parts:  # stateful parts (eagle) read what each step committed
            hook = getattr(part, "propd_after_step", None)
            if hook is not None:  # with the arguments it takes, as pluggy would call it
                hook(**{k: v for k, v in kw.items() if k in inspect.signature(hook).parameters})

    @hookimpl
    def propd_propose(self, ctx, tree):
        from propd.types import Draft

        roots = ctx.roots.tolist()
        trie = TrieRows(roots, tree.num_nodes)
        from propd.decoder import check_draft

        for name, part in zip(self.names, self.parts):
            d = check_draft(part.propd_propose(ctx=ctx, tree=tree), tree, ctx.roots, self.vocab_size,
                            f"proposer 'composite' part {name!r}")
            rows = d.rows
            tokens, parents = d.tokens.tolist(), rows.parents.tolist()
            present = d.present.tolist() if d.present is not None else None
            for b in range(len(roots)):
                mapped = [0] + [None] * (len(tokens[b]) - 1)  # part node -> merged node
                for i in range(1, len(tokens[b])):
                    if present is not None and not present[b][i]:
                        continue
                    parent = mapped[parents[b][i]]
                    if parent is not None:
                        mapped[i] = trie.add(b, parent, tokens[b][i])
        return trie.draft(ctx.device)


@hookimpl
def propd_register_components(register):
    register("proposer", "composite", CompositeProposer, CompositeConfig,
             "several proposers' drafts merged into one tree, in the order given (parts=[\"A\",\"B\"])")
