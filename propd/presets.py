"""Named strategy combinations. A preset only names components; the loop never sees the preset's name."""

from __future__ import annotations

from typing import Any

import attrs

from propd.errors import PropdError

Spec = tuple[str, dict[str, Any]]


@attrs.frozen
class Preset:
    name: str
    description: str
    sizer: Spec
    verifier: Spec = ("greedy", {})
    proposer: Spec | None = None
    pruners: tuple[Spec, ...] = ()


# ProPD's pruning layer and top-k as chosen by `propd tune` for the default model on held-out training prompts
# (docs/propd.md, "Parameters"): layer 2 with k 50 was the fastest cell, and k 50 the fastest k at every layer. The
# paper's own choice for Vicuna-7B (layer 4, k 50) stays the `early-topk` component's default. Trees under 16 nodes
# are left whole: in the same tuning run, `propd` at batch 1 measured 0.94x `ar` pruning every tree, 0.96x from 8
# nodes, 0.99x from 16 and 1.06x never pruning; pruning the 2-4 node trees the sizer picks on a CPU lowered the
# accepted length (1.34 -> 1.21 at batch 1) and saved no time (docs/propd.md, "Parameters").
PROPD_PRUNER: Spec = ("early-topk", {"layer": 2, "k": 50, "min_nodes": 16})

# EAGLE-2's reranked trees: N nodes (root included) at most D deep. EAGLE-2 uses N = 60, D = 5-6, top-k 10 for 7B
# models on GPUs; on a CPU a step's cost grows fast with N, and N = 3 (D = 2, top-k 4) is near the fastest fixed tree
# on the drafter's held-out training prompts in float32 and with GGUF blocks (docs/heads.md, "EAGLE drafter").
EAGLE_BUDGET = "budget:3:2"
EAGLE_PROPOSER: Spec = ("eagle", {"top_k": 4})
# ``calib_lam``: a calibration learned in a stretch of poor drafts fades back towards the prior while the sizer runs
# 1-node steps (half-life about 70 steps), so that trees come back on the next prompts that suit them; without it the
# sizer kept 1-node steps for the rest of a run (chosen on held-out training prompts: docs/propd.md, refinement 4).
EAGLE_DYNAMIC: Spec = ("propd-dynamic", {"max_depth": 6, "sizes": (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
                                         "unseen": "inherit", "calib_lam": 0.01})

PRESETS = {
    p.name: p
    for p in (
        Preset("ar", "autoregressive: one token per forward pass (the baseline; no proposer)",
               sizer=("static", {"tree": "chain:0"})),
        Preset("bpd", "blockwise parallel decoding: a chain of each head's top-1 guess (Stern et al. 2018)",
               sizer=("static", {"tree": "chain"}), proposer=("medusa", {})),
        Preset("medusa", "Medusa heads + the published mc_sim_7b_63 tree (Cai et al. 2023)",
               sizer=("static", {"tree": "mc_sim_7b_63"}), proposer=("medusa", {})),
        Preset("propd", "ProPD: Medusa heads, early top-k pruning and dynamic tree sizing (Zhong et al. 2024)",
               sizer=("propd-dynamic", {}), proposer=("medusa", {}), pruners=(PROPD_PRUNER,)),
        Preset("propd-prune-only", "ablation: mc_sim_7b_63 with early top-k pruning, no dynamic sizing",
               sizer=("static", {"tree": "mc_sim_7b_63"}), proposer=("medusa", {}), pruners=(PROPD_PRUNER,)),
        Preset("propd-dynamic-only", "ablation: dynamic tree sizing, no pruning",
               sizer=("propd-dynamic", {}), proposer=("medusa", {})),
        Preset("eagle", "EAGLE-2: per-row dynamic trees of an EAGLE drafter, 3 nodes, 2 deep (Li et al. 2024)",
               sizer=("static", {"tree": EAGLE_BUDGET}), proposer=EAGLE_PROPOSER),
        Preset("propd-eagle", "ProPD on EAGLE drafts: EAGLE-2 trees, early top-k pruning and dynamic tree sizing",
               sizer=EAGLE_DYNAMIC, proposer=("eagle", {}), pruners=(PROPD_PRUNER,)),
        Preset("propd-eagle-prune-only", "ablation: EAGLE-2 trees of 32 nodes with early top-k pruning",
               sizer=("static", {"tree": "budget:32:6"}), proposer=("eagle", {}), pruners=(PROPD_PRUNER,)),
        Preset("propd-eagle-dynamic-only", "ablation: EAGLE-2 trees with dynamic tree sizing, no pruning",
               sizer=EAGLE_DYNAMIC, proposer=("eagle", {})),
    )
}


AUTO = "auto"


def auto_preset(model: Any) -> str:
    """The preset ``auto`` stands for: the fastest lossless combination this model supports on its device.

    The rule: on a GPU, ``propd`` when the model has Medusa heads and the early head its pruner reads, else
    ``propd-dynamic-only`` with Medusa heads alone; ``ar`` without heads and on a CPU. On a CPU a tree step costs
    well above an AR step (each token row adds its arithmetic; step cost by tree size: docs/architecture.md) and the
    shipped drafts accept too few tokens to repay it (README and docs/results.md give the measured figures). On a GPU
    a 64-node step costs about 1.2 AR steps, so trees can pay.
    """
    if getattr(model, "heads", None) is None or getattr(model, "device", None) is None:
        return "ar"
    if model.device.type == "cpu":
        return "ar"
    if PROPD_PRUNER[1]["layer"] in getattr(model, "early_heads", {}):
        return "propd"
    return "propd-dynamic-only"


def as_spec(arg: Any) -> Spec:
    """A component given as ``NAME``, ``NAME:key=value,...`` or ``(name, options)``, as ``(name, options)``."""
    if isinstance(arg, str):
        return parse_component(arg)
    name, options = arg
    return name, dict(options or {})


def all_presets(registry: Any = None) -> dict[str, Preset]:
    """The built-in presets and those registered by installed plugins (``propd_register_presets``)."""
    if registry is None:
        from propd.plugins import Registry

        registry = Registry()
    return {**PRESETS, **registry.presets}


def get_preset(name: str, registry: Any = None) -> Preset:
    if name in PRESETS:
        return PRESETS[name]
    known = all_presets(registry)
    try:
        return known[name]
    except KeyError:
        raise PropdError(f"unknown preset {name!r} (known: {AUTO}, {', '.join(known)})") from None


def check_preset(name: str) -> None:
    """Fail fast on an unknown preset name (``auto`` included), before anything is loaded."""
    if name != AUTO:
        get_preset(name)


ROLES = ("sizer", "proposer", "pruner", "verifier")


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets and quotes."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_component(text: str) -> Spec:
    """``NAME`` or ``NAME:key=value,key=value`` -> (name, options); values are JSON when they parse as JSON
    (numbers, booleans, ``[1,2,4]``), else strings. Example: ``early-topk:layer=2,k=100``."""
    import json

    name, _, rest = text.strip().partition(":")
    if not name:
        raise PropdError(f"bad component {text!r}: expected NAME or NAME:key=value,...")
    options: dict[str, Any] = {}
    for item in _split_top(rest, ",") if rest.strip() else []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise PropdError(f"bad option {item!r} in {text!r}: expected key=value")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
        if isinstance(options[key.strip()], list):
            options[key.strip()] = tuple(options[key.strip()])
    return name.strip(), options


@attrs.frozen
class Method:
    """A named method for comparisons: a preset with some roles replaced.

    Written ``LABEL=PRESET;ROLE=COMPONENT;...`` (``propd bench --variant``), e.g.
    ``prune-l2-k100=propd-prune-only;pruner=early-topk:layer=2,k=100``; ``pruner=none`` removes the pruners and
    repeating ``pruner=`` stacks several; ``draft_vocab=N`` sets the Decoder's draft vocabulary size.
    """

    label: str
    preset: str
    overrides: dict[str, Any] = attrs.Factory(dict)

    @classmethod
    def parse(cls, text: str) -> "Method":
        label, eq, rest = text.partition("=")
        if not eq or not label.strip() or not rest.strip():
            raise PropdError(f"bad method {text!r}: expected LABEL=PRESET[;ROLE=COMPONENT...]")
        parts = _split_top(rest, ";")
        preset = parts[0].strip()
        get_preset(preset)
        overrides: dict[str, Any] = {}
        for part in parts[1:]:
            role, eq, comp = part.partition("=")
            role = role.strip()
            if eq and role == "draft_vocab":
                try:
                    overrides["draft_vocab"] = int(comp)
                except ValueError:
                    raise PropdError(f"bad override {part!r} in {text!r}: draft_vocab takes a whole number") from None
                continue
            if not eq or role not in ROLES:
                raise PropdError(f"bad override {part!r} in {text!r}: expected ROLE=COMPONENT with ROLE one of "
                                 f"{', '.join(ROLES)}, or draft_vocab=N")
            if role == "pruner":
                pruners = overrides.setdefault("pruners", [])
                if comp.strip() != "none":
                    pruners.append(parse_component(comp))
            else:
                overrides[role] = parse_component(comp)
        return cls(label.strip(), preset, overrides)

    def decoder_kwargs(self) -> dict[str, Any]:
        return {"preset": self.preset, **self.overrides}
