"""Verifier ``typical``: Medusa's typical acceptance, for sampling (Cai et al. 2023, sec. 3.2.1). NOT lossless.

With temperature tau, a node's token x is accepted when the base model's distribution at its parent,
``p = softmax(logits / tau)``, gives it more than a threshold set by that distribution's entropy H:

    p(x) > min(epsilon, delta * exp(-H))

(Hewitt et al. 2022's truncation sampling criterion, as Medusa uses it; Medusa's defaults epsilon = 0.09,
delta = 0.3). The deepest path whose nodes are all accepted is kept, and the token after it is sampled from the
distribution at its end truncated the same way (the argmax is always allowed). The output is a plausible sample,
not a sample of ``p`` itself and not greedy decoding: use the ``greedy`` verifier (the default) when the output must
equal plain greedy decoding. Sampling is seeded (``seed``), so runs repeat on the same machine.
"""

from __future__ import annotations

import attrs
import torch

from propd.errors import PropdError
from propd.hookspecs import hookimpl
from propd.strategies.greedy import accept_from_correct


@attrs.frozen
class TypicalConfig:
    temperature: float = 0.7
    epsilon: float = 0.09  # posterior threshold
    delta: float = 0.3  # posterior alpha (Medusa uses sqrt(epsilon))
    seed: int = 0


def typical_allowed(logits: torch.Tensor, cfg: TypicalConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities ``softmax(logits / tau)`` (.., V) and the mask of tokens above the typical threshold."""
    logp = torch.log_softmax(logits.float() / cfg.temperature, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(dim=-1, keepdim=True)
    threshold = torch.minimum(torch.full_like(entropy, cfg.epsilon), cfg.delta * torch.exp(-entropy))
    allowed = p > threshold
    allowed.scatter_(-1, p.argmax(dim=-1, keepdim=True), True)  # never an empty choice
    return p, allowed


class TypicalVerifier:
    def __init__(self, config: TypicalConfig):
        if config.temperature <= 0:
            raise PropdError("typical acceptance needs temperature > 0 (use the greedy verifier for temperature 0)")
        if not 0 < config.epsilon <= 1 or config.delta <= 0:
            raise PropdError("typical acceptance needs 0 < epsilon <= 1 and delta > 0")
        self.cfg = config
        self.generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self.generators:
            self.generators[key] = torch.Generator(device=device).manual_seed(self.cfg.seed)
        return self.generators[key]

    @hookimpl
    def propd_verify(self, draft, nodes, logits):
        rows, tokens = draft.rows, draft.tokens
        p, allowed = typical_allowed(logits, self.cfg)  # (B, T', V) at the live nodes
        at_parent = nodes.position(rows.parents.clamp(min=0))  # (B, T): the parent's row in the live layout
        batch = torch.arange(tokens.shape[0], device=tokens.device)
        correct = allowed[batch[:, None], at_parent, tokens] & nodes.alive()  # (B, T): token allowed at its parent
        acc = accept_from_correct(rows, correct, torch.zeros_like(tokens))
        at_best = nodes.position(acc.best[:, None])[:, 0]  # (B,)
        q = torch.where(allowed[batch, at_best], p[batch, at_best], 0.0)
        bonus = torch.multinomial(q / q.sum(dim=-1, keepdim=True), 1, generator=self._generator(q.device))[:, 0]
        return attrs.evolve(acc, bonus=bonus)


@hookimpl
def propd_register_components(register):
    register("verifier", "typical", TypicalVerifier, TypicalConfig,
             "Medusa typical acceptance for sampling (temperature, epsilon, delta, seed); not lossless")
