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
               sizer=("propd-dynamic", {}), proposer=("medusa", {}), pruners=(("early-topk", {}),)),
        Preset("propd-prune-only", "ablation: mc_sim_7b_63 with early top-k pruning, no dynamic sizing",
               sizer=("static", {"tree": "mc_sim_7b_63"}), proposer=("medusa", {}), pruners=(("early-topk", {}),)),
        Preset("propd-dynamic-only", "ablation: dynamic tree sizing, no pruning",
               sizer=("propd-dynamic", {}), proposer=("medusa", {})),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise PropdError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None
