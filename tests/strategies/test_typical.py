"""The typical-acceptance verifier: greedy in the zero-temperature limit, seeded, and thresholded as Medusa's."""

import math

import pytest
import torch

from conftest import tiny_loaded
from propd import Decoder, PropdError
from propd.strategies.typical import TypicalConfig, typical_allowed
from propd.testing import random_prompts

MODEL = tiny_loaded(seed=7, heads=4, early=(1,))


def prompts_from(seed, lens):
    return random_prompts(MODEL, seed, lens)


def test_threshold_follows_entropy():
    p = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01])
    entropy = -(p * p.log()).sum().item()
    cfg = TypicalConfig(temperature=1.0, epsilon=0.09, delta=0.3)
    probs, allowed = typical_allowed(p.log(), cfg)
    threshold = min(0.09, 0.3 * math.exp(-entropy))  # 0.3 * exp(-1.18) = 0.092 -> epsilon wins
    assert torch.allclose(probs, p, atol=1e-6)
    assert allowed.tolist() == [x > threshold for x in p.tolist()] == [True, True, True, False, False]
    flat = torch.zeros(5)  # uniform: high entropy makes delta * exp(-H) the smaller bound, every token passes
    assert typical_allowed(flat, cfg)[1].all()
    peaked = torch.tensor([0.0, -50.0, -50.0])  # the argmax is always allowed, even above any threshold
    assert typical_allowed(peaked, TypicalConfig(temperature=1.0, epsilon=1.0, delta=1.0))[1].tolist() == [True,
                                                                                                           False,
                                                                                                           False]


@pytest.mark.parametrize("preset", ["ar", "medusa", "propd-prune-only"])
def test_near_zero_temperature_is_greedy(preset):
    prompts = prompts_from(1, [4, 9, 6])
    greedy = Decoder(MODEL, preset="ar").generate_ids(prompts, max_new_tokens=20).token_ids
    pruners = [("early-topk", {"layer": 1, "k": 8})] if preset == "propd-prune-only" else None
    dec = Decoder(MODEL, preset=preset, verifier=("typical", {"temperature": 1e-7}), pruners=pruners)
    assert dec.generate_ids(prompts, max_new_tokens=20).token_ids == greedy


def test_sampling_is_seeded_and_accepts_guesses():
    prompts = prompts_from(2, [5, 7])

    def run(seed):
        dec = Decoder(MODEL, preset="medusa", verifier=("typical", {"temperature": 1.5, "seed": seed}))
        return dec.generate_ids(prompts, max_new_tokens=24)

    a, b, c = run(0), run(0), run(1)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    greedy = Decoder(MODEL, preset="ar").generate_ids(prompts, max_new_tokens=24).token_ids
    assert a.token_ids != greedy  # it really samples
    assert all(len(t) == 24 for t in a.token_ids)


def test_bad_settings_are_refused():
    with pytest.raises(PropdError, match="temperature > 0"):
        Decoder(MODEL, preset="ar", verifier=("typical", {"temperature": 0}))
    with pytest.raises(PropdError, match="epsilon"):
        Decoder(MODEL, preset="ar", verifier=("typical", {"epsilon": 0.0}))
