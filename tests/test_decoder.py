"""Lossless: every preset's and every random tree's output equals greedy AR decoding of each prompt alone."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import tiny_hf, tiny_loaded
from propd import Decoder, PropdError
from propd_oracle import OracleConfig, OracleProposer, RandomPruneConfig, RandomPruner
from strategies_ht import tree_paths

MODEL = tiny_loaded(seed=3, heads=4)


def ar_alone(model, prompt, n):
    return Decoder(model, preset="ar").generate_ids([prompt], max_new_tokens=n).token_ids[0]


def prompts_from(seed, lens):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, MODEL.config.vocab_size, (n,), generator=g).tolist() for n in lens]


@given(paths=tree_paths(max_nodes=20), lens=st.lists(st.integers(1, 16), min_size=1, max_size=8),
       seed=st.integers(0, 10_000), corrupt=st.sampled_from([0.0, 0.1, 0.4, 1.0]),
       max_new=st.integers(1, 24), prune=st.booleans())
def test_oracle_trees_are_lossless(paths, lens, seed, corrupt, max_new, prune):
    prompts = prompts_from(seed, lens)
    refs = [ar_alone(MODEL, p, max_new) for p in prompts]
    oracle = OracleProposer(OracleConfig(continuations=dict(enumerate(refs)), corrupt=corrupt, seed=seed))
    pruners = [RandomPruner(RandomPruneConfig(layer=1 + seed % 3, keep=0.7, seed=seed))] if prune else []
    dec = Decoder(MODEL, sizer=("static", {"tree": tuple(paths)}), proposer=oracle, pruners=pruners)
    res = dec.generate_ids(prompts, max_new_tokens=max_new)
    assert res.token_ids == refs
    assert all(len(t) == max_new for t in res.token_ids)
    gained = [a for s in res.stats for a in s.accepted]
    assert all(1 <= a <= max(len(p) for p in paths or [()]) + 1 for a in gained)
    if corrupt == 0.0 and paths and not prune and max_new > 8:
        assert max(gained) > 1  # the oracle's branch is accepted


def test_oracle_acceptance_spans_zero_to_depth():
    prompts = prompts_from(7, [5, 9, 3, 12])
    refs = [ar_alone(MODEL, p, 40) for p in prompts]
    oracle = OracleProposer(OracleConfig(continuations=dict(enumerate(refs)), corrupt=0.3, seed=1))
    dec = Decoder(MODEL, sizer=("static", {"tree": "chain:4"}), proposer=oracle)
    res = dec.generate_ids(prompts, max_new_tokens=40)
    assert res.token_ids == refs
    gained = {a for s in res.stats for a in s.accepted}
    assert {1, 5} <= gained  # nothing accepted, and the whole depth accepted, both happen


@pytest.mark.parametrize("preset", ["ar", "bpd", "medusa"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_presets_are_lossless(preset, batch):
    prompts = prompts_from(batch, [1, 4, 9, 2, 13, 6, 3, 8][:batch])
    refs = [ar_alone(MODEL, p, 20) for p in prompts]
    res = Decoder(MODEL, preset=preset).generate_ids(prompts, max_new_tokens=20)
    assert res.token_ids == refs
    assert res.steps == [len(t) for t in refs] if preset == "ar" else all(s <= 20 for s in res.steps)


def test_batch_size_chunks_and_progress_give_same_tokens():
    prompts = prompts_from(11, [3, 5, 7, 2, 4])
    dec = Decoder(MODEL, preset="medusa")
    a = dec.generate_ids(prompts, max_new_tokens=12)
    b = dec.generate_ids(prompts, max_new_tokens=12, batch_size=2, progress=True)
    assert a.token_ids == b.token_ids


def test_rows_stop_on_their_own_eos_and_leave_the_batch():
    prompts = prompts_from(5, [4, 6, 8])
    refs = [ar_alone(MODEL, p, 30) for p in prompts]
    stop = refs[1][10]  # a token that the second row emits at position 10
    model = tiny_loaded(seed=3, heads=4, eos=frozenset({stop}))
    for preset in ("ar", "medusa"):
        res = Decoder(model, preset=preset).generate_ids(prompts, max_new_tokens=30)
        for ref, got in zip(refs, res.token_ids):
            want = ref[: ref.index(stop) + 1] if stop in ref else ref
            assert got == want  # ends with the EOS token, as transformers' output does
        sizes = [s.batch_size for s in res.stats]
        assert sizes == sorted(sizes, reverse=True) and sizes[-1] < 3  # finished rows left the batch


def test_matches_transformers_generate():
    hf, cfg = tiny_hf(3)
    prompts = prompts_from(2, [6, 11, 3])
    res = Decoder(MODEL, preset="medusa").generate_ids(prompts, max_new_tokens=16)
    for p, got in zip(prompts, res.token_ids):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                              pad_token_id=0, min_new_tokens=16)
        assert out[0, len(p):].tolist() == got


def test_stats_and_mean_accepted():
    prompts = prompts_from(1, [5])
    res = Decoder(MODEL, preset="ar").generate_ids(prompts, max_new_tokens=10)
    assert res.mean_accepted_tokens(0) == 1.0 and res.steps == [10]
    assert all(s.tree_nodes == 1 and s.prune_rate == 0 for s in res.stats)
    med = Decoder(MODEL, preset="medusa").generate_ids(prompts_from(2, [4, 7]), max_new_tokens=15)
    for i, acc in enumerate(med.accept_lengths):
        assert sum(acc) == med.new_tokens[i] and len(acc) == med.steps[i] and acc[0] == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[], n=4), "no prompts"),
    (dict(prompts=[[]], n=4), "empty"),
    (dict(prompts=[[1, 2]], n=0), "positive"),
    (dict(prompts=[[1] * 500], n=100), "context"),
    (dict(prompts=[[1, 999]], n=4), "vocabulary"),
])
def test_bad_input_is_refused(kwargs, match):
    with pytest.raises(PropdError, match=match):
        Decoder(MODEL, preset="ar").generate_ids(kwargs["prompts"], max_new_tokens=kwargs["n"])


def test_heads_are_required_for_medusa_presets():
    for preset in ("bpd", "medusa"):
        with pytest.raises(PropdError, match="heads"):
            Decoder(tiny_loaded(seed=0), preset=preset)


def test_tree_deeper_than_heads_is_refused():
    model = tiny_loaded(seed=0, heads=2)
    dec = Decoder(model, preset="medusa")
    with pytest.raises(PropdError, match="deep"):
        dec.generate_ids([[1, 2, 3]], max_new_tokens=4)


def test_components_take_command_line_strings():
    """``sizer="NAME:key=value"`` in Python means what ``--sizer NAME:key=value`` means on the command line."""
    model = tiny_loaded(seed=3, heads=4, early=(1,))
    dec = Decoder(model, preset="medusa", sizer="static:tree=chain:3", pruners=["early-topk:layer=1,k=3"])
    sizer = dict(dec.components)["sizer"]
    assert sizer.spec == "chain:3"
    assert dec.prune_layers == [1]
    with pytest.raises(PropdError, match="unknown sizer 'nope'"):
        Decoder(MODEL, preset="medusa", sizer="nope:size=4")
    with pytest.raises(PropdError, match="size"):
        Decoder(MODEL, preset="medusa", sizer="static:size=4")
