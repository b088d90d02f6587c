"""Sampling settings, the logits processing shared by AR sampling and verification, and per-row generators.

``temperature`` 0 is greedy decoding. Otherwise the next-token distribution is ``softmax(logits / temperature)``
restricted to the ``top_k`` most likely tokens (0: all) and to the smallest set whose mass reaches ``top_p``
(nucleus sampling, Holtzman et al. 2020; 1: all), renormalized: the same processing as transformers' logits warpers,
applied identically by AR sampling and by the speculative verifier, so both sample the same distribution.

Each prompt draws from its own generator, seeded from (seed, prompt index in the call): a run repeats for a seed
whatever the batch size and composition, and copies of one prompt give independent samples.
"""

from __future__ import annotations

import attrs
import torch

from propd.errors import PropdError


@attrs.frozen
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __attrs_post_init__(self):
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise PropdError(f"{name} must be a number, got {v!r}")
        if self.temperature < 0:
            raise PropdError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PropdError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise PropdError(f"top_k must be a whole number >= 0 (0: no limit), got {self.top_k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 64:
            raise PropdError(f"seed must be a whole number in 0 .. 2**64 - 1, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution (.., V) float32 for logits (.., V): temperature, then top-k, then top-p."""
    z = logits.float() / params.temperature
    V = z.shape[-1]
    if 0 < params.top_k < V:
        kth = z.topk(params.top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    p = torch.softmax(z, dim=-1)
    if params.top_p < 1:
        sp, idx = p.sort(dim=-1, descending=True)
        before = sp.cumsum(dim=-1) - sp  # mass of the tokens ranked above each one
        drop = before >= params.top_p  # the most likely token is always kept (its "before" is 0)
        sp = sp.masked_fill(drop, 0.0)
        p = torch.zeros_like(p).scatter_(-1, idx, sp)
        p = p / p.sum(dim=-1, keepdim=True)
    return p


def row_generators(seed: int, rows: range | list[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per prompt index, seeded from (seed, index) through numpy's SeedSequence (independent streams)."""
    import numpy as np

    out = []
    for i in rows:
        state = int(np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, i]).generate_state(1,
                                                                                                       np.uint64)[0])
        out.append(torch.Generator(device=device).manual_seed(state & 0x7FFFFFFFFFFFFFFF))
    return out


def draw(p: torch.Tensor, generator: torch.Generator) -> int:
    """One token from the distribution ``p`` (V,)."""
    return int(torch.multinomial(p, 1, generator=generator))


def uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, device=generator.device))
