"""Proposer ``composite``: several proposers' drafts merged into one per-row token tree.

Each part drafts within the sizer's budget; their trees are merged as tries (a path two parts share is one path),
the parts taken in the order given, each part's nodes in its own order, until the budget is full. Put the most
precise part first: ``composite:parts=["prompt-lookup","medusa"]`` keeps a lookup match whole and fills the rest of
the budget with Medusa's guesses. ``budgets`` caps each part's share (nodes, root included): with
``parts=["prompt-lookup","eagle"],budgets=[7,3]`` in a 9-node budget, a row whose history has no match verifies
EAGLE's 3 nodes, and one with a match adds up to 6 lookup tokens; without caps a part fills whatever budget is left,
which on a CPU, where every verified node costs, makes a proposer that always fills its budget (``eagle``,
``medusa``) as dear as the largest tree. ``later="empty"`` runs a later part only for rows the parts before it left
empty (a step whose every row has a lookup match then skips EAGLE's drafting; its reading waits for the next draft).
Lossless like any draft: the verifier decides.
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
    # per part, the most nodes (root included) it drafts within the sizer's budget; empty: each the whole budget
    budgets: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    # "always": every part drafts every step; "empty": a later part drafts only when some row's tree is still its
    # root alone, and adds nodes to those rows only (a step where every row has a match skips it)
    later: str = attrs.field(default="always", validator=attrs.validators.in_(("always", "empty")))


class CompositeProposer:
    def __init__(self, config: CompositeConfig):
        if len(config.parts) < 1:
            raise PropdError("composite needs at least one part: parts=[\"NAME\", ...]")
        if config.budgets and (len(config.budgets) != len(config.parts)
                               or not all(isinstance(b, int) and b >= 1 for b in config.budgets)):
            raise PropdError(f"composite budgets={list(config.budgets)}: give one node count >= 1 per part "
                             f"({len(config.parts)} parts)")
        self.cfg = config
        self.parts: list = []
        self.names: list[str] = []
        self.vocab_size = None
        self._sub_trees: dict = {}  # (nodes, depth, device) -> the budget tree a capped part drafts in

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
    def propd_rows_join(self, rows):
        for part in self.parts:
            if hasattr(part, "propd_rows_join"):
                part.propd_rows_join(rows=rows)

    @property
    def rows_can_join(self) -> bool:
        """Whether every part takes rows joining a running batch (``propd.decoder.rows_can_join``)."""
        from propd.decoder import rows_can_join

        return all(rows_can_join(part) for part in self.parts)

    @hookimpl
    def propd_rows_leave(self, keep, left):
        for part in self.parts:
            if hasattr(part, "propd_rows_leave"):
                part.propd_rows_leave(keep=keep, left=left)

    @hookimpl
    def propd_after_step(self, ctx, draft, acceptance, stats, tree, tokens, path_hidden):
        kw = dict(ctx=ctx, draft=draft, acceptance=acceptance, stats=stats, tree=tree, tokens=tokens,
                  path_hidden=path_hidden)
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

        caps = self.cfg.budgets or (tree.num_nodes,) * len(self.parts)
        for j, (name, part, cap) in enumerate(zip(self.names, self.parts, caps)):
            rows_open = range(len(roots))
            if j and self.cfg.later == "empty":
                rows_open = [b for b in rows_open if len(trie.tokens[b]) == 1]
                if not rows_open:
                    continue
            sub = self._sub_tree(min(cap, tree.num_nodes), tree.max_depth, ctx.device) if cap < tree.num_nodes else tree
            d = check_draft(part.propd_propose(ctx=ctx, tree=sub), sub, ctx.roots, self.vocab_size,
                            f"proposer 'composite' part {name!r}")
            rows = d.rows
            tokens, parents = d.tokens.tolist(), rows.parents.tolist()
            present = d.present.tolist() if d.present is not None else None
            for b in rows_open:
                mapped = [0] + [None] * (len(tokens[b]) - 1)  # part node -> merged node
                for i in range(1, len(tokens[b])):
                    if present is not None and not present[b][i]:
                        continue
                    parent = mapped[parents[b][i]]
                    if parent is not None:
                        mapped[i] = trie.add(b, parent, tokens[b][i])
        return trie.draft(ctx.device)

    def _sub_tree(self, nodes: int, depth: int, device):
        """The budget a capped part drafts in: ``budget:nodes:D``, D the sizer's depth bounded by nodes - 1."""
        from propd.tree import DraftTree, tree_paths

        key = (nodes, min(depth, nodes - 1), device)
        if key not in self._sub_trees:
            self._sub_trees[key] = DraftTree.from_paths(tree_paths(f"budget:{nodes}:{key[1]}"), device=device)
        return self._sub_trees[key]


@hookimpl
def propd_register_components(register):
    register("proposer", "composite", CompositeProposer, CompositeConfig,
             "several proposers' drafts merged into one tree, in the order given (parts=[\"A\",\"B\"])")
