"""propd's Llama forward against transformers' own, on tiny random models."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import tiny_hf
from propd import DraftTree, PropdError
from propd.models.config import ModelConfig
from propd.models.llama import LlamaModel, prefill_groups
from propd.tree import survivors
from strategies_ht import tree_paths


def ours(hf, cfg):
    m = LlamaModel(cfg)
    m.load_state_dict(hf.state_dict(), strict=False)
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def pair():
    hf, cfg = tiny_hf(1)
    return hf, ours(hf, cfg)


def hf_last_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1]


def test_config_roundtrip_and_refusal():
    cfg = ModelConfig.tiny()
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    from transformers import GPT2Config

    with pytest.raises(PropdError, match="llama"):
        ModelConfig.from_hf(GPT2Config())


@given(st.lists(st.integers(1, 24), min_size=1, max_size=5), st.integers(0, 1000))
def test_batched_prefill_matches_transformers(pair, lens, seed):
    hf, m = pair
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in lens]
    cache = m.new_cache(len(prompts), 64)
    with torch.no_grad():
        logits = m.logits(m.prefill(cache, prompts))
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i], hf_last_logits(hf, p), atol=2e-5, rtol=1e-4)
    assert cache.host_lengths == lens and cache.lengths.tolist() == lens


@given(st.lists(st.integers(1, 24), min_size=1, max_size=4), st.integers(1, 9), st.integers(0, 1000))
def test_chunked_prefill_matches_transformers_at_every_position(pair, lens, chunk, seed):
    hf, m = pair
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in lens]
    cache = m.new_cache(len(prompts), max(lens) + 2)  # the capacity hidden_states' callers give it
    whole = m.new_cache(len(prompts), max(lens) + 2)
    m.PREFILL_CHUNK = chunk  # an instance attribute: the class's stays
    try:
        with torch.no_grad():
            final, cap = m.hidden_states(cache, prompts, (1,))
    finally:
        del m.PREFILL_CHUNK
    with torch.no_grad():
        _, cap_whole = m.hidden_states(whole, prompts, (1,))
        for i, p in enumerate(prompts):
            ref = hf(torch.tensor([p])).logits[0]  # (n, V)
            torch.testing.assert_close(m.logits(final[i, : len(p)]), ref, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(cap[1][i, : len(p)], cap_whole[1][i, : len(p)], atol=1e-5, rtol=1e-4)
            n = len(p)
            torch.testing.assert_close(cache.k[:, i, :, :n], whole.k[:, i, :, :n], atol=1e-5, rtol=1e-4)
    assert cache.host_lengths == lens and cache.lengths.tolist() == lens


@given(st.lists(st.integers(1, 800), min_size=1, max_size=16), st.sampled_from([0.0, 0.125, 1.0]))
def test_prefill_groups_cover_every_row_once_and_bound_the_padding(lens, waste):
    groups = prefill_groups(lens, waste)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    for g in groups:
        longest = max(lens[i] for i in g)
        assert lens[g[0]] == longest
        assert len(g) == 1 or len(g) * longest <= (1 + waste) * sum(lens[i] for i in g) + 1e-9
    if len(set(lens)) == 1:
        assert len(groups) == 1  # equal lengths: one batched prefill, no padding
    # Spec-Bench's 13 sample prompts (chat template, default model): padded to the longest they were 9,971 tokens
    spec = [45, 56, 59, 63, 71, 72, 78, 85, 100, 243, 373, 448, 767]
    padded = sum(len(g) * max(spec[i] for i in g) for g in prefill_groups(spec, 0.125))
    assert padded <= 1.125 * sum(spec) < 13 * 767 / 3


def test_grouped_prefill_fills_the_cache_like_one_padded_batch(pair):
    _, m = pair
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (30, 2, 17, 30, 5)]
    assert len(prefill_groups([len(p) for p in prompts], m.PREFILL_WASTE)) > 1
    grouped, padded = m.new_cache(5, 40), m.new_cache(5, 40)
    with torch.no_grad():
        last = m.prefill(grouped, prompts)
        final, _ = m.hidden_states(padded, prompts)
    for b, p in enumerate(prompts):
        n = len(p)
        torch.testing.assert_close(last[b], final[b, n - 1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grouped.k[:, b, :, :n], padded.k[:, b, :, :n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grouped.v[:, b, :, :n], padded.v[:, b, :, :n], atol=1e-5, rtol=1e-4)
    assert grouped.host_lengths == padded.host_lengths and grouped.lengths.tolist() == padded.lengths.tolist()
    with pytest.raises(PropdError, match="empty cache"):
        m.prefill(grouped, prompts)


def tree_step(m, cache, tree, tokens, prune_keep=None, split=2):
    """One tree forward (optionally pruning after ``split`` layers); returns (logits per tree node or None)."""
    B, T = tokens.shape
    node_idx = torch.arange(T).expand(B, T)
    valid = torch.ones(B, T, dtype=torch.bool)
    a = m.attention_inputs(cache, node_idx, tree.mask, tree.depths)
    h = m.embed(tokens)
    start = 0
    if prune_keep is not None:
        h = m.run_layers(h, 0, split, cache, a)
        start = split
        new_idx, valid = survivors(tree.keep_closure(prune_keep), T)
        h = h.gather(1, new_idx.clamp(max=T - 1)[..., None].expand(-1, -1, h.shape[-1]))
        node_idx = new_idx
        a = m.attention_inputs(cache, node_idx, tree.mask, tree.depths)
    h = m.norm(m.run_layers(h, start, m.num_layers, cache, a))
    logits = m.logits(h)
    full = [[None] * T for _ in range(B)]
    for b in range(B):
        for j in range(node_idx.shape[1]):
            if valid[b, j]:
                full[b][int(node_idx[b, j])] = logits[b, j]
    return full


@given(tree_paths(max_nodes=12), st.lists(st.integers(1, 12), min_size=1, max_size=4), st.integers(0, 1000),
       st.booleans())
def test_tree_forward_matches_sequential_forward(pair, paths, lens, seed, prune):
    """Each tree node's logits equal transformers' logits for prompt + the tokens on the node's root path."""
    hf, m = pair
    tree = DraftTree.from_paths(paths)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in lens]
    tokens = torch.randint(0, 128, (len(prompts), tree.num_nodes), generator=g)
    keep = torch.rand(tokens.shape, generator=g) < 0.6 if prune else None
    cache = m.new_cache(len(prompts), 64)
    with torch.no_grad():
        m.prefill(cache, prompts)
        out = tree_step(m, cache, tree, tokens, keep)
    closed = tree.keep_closure(keep) if prune else torch.ones_like(tokens, dtype=torch.bool)
    for b, p in enumerate(prompts):
        for j in range(tree.num_nodes):
            if not closed[b, j]:
                assert out[b][j] is None
                continue
            chain = tree.paths_to[j, : int(tree.depths[j]) + 1].tolist()
            ref = hf_last_logits(hf, p + tokens[b, chain].tolist())
            torch.testing.assert_close(out[b][j], ref, atol=2e-5, rtol=1e-4)


@given(tree_paths(max_nodes=12), st.integers(0, 1000))
def test_commit_equals_recomputation(pair, paths, seed):
    """After committing a random accepted path per row, the cache equals a fresh prefill of the whole sequence."""
    hf, m = pair
    tree = DraftTree.from_paths(paths)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 7, 5)]
    tokens = torch.randint(0, 128, (3, tree.num_nodes), generator=g)
    best = torch.randint(0, tree.num_nodes, (3,), generator=g)
    cache = m.new_cache(3, 64)
    with torch.no_grad():
        m.prefill(cache, prompts)
        tree_step(m, cache, tree, tokens)
        path = tree.paths_to[best]
        counts = tree.depths[best] + 1
        cache.commit(path, counts, counts.tolist())
        full = [p + tokens[b, path[b, : counts[b]]].tolist() for b, p in enumerate(prompts)]
        ref = m.new_cache(3, 64)
        m.prefill(ref, full)
    assert cache.host_lengths == ref.host_lengths == [len(f) for f in full]
    for b, f in enumerate(full):
        n = len(f)
        torch.testing.assert_close(cache.k[:, b, :, :n], ref.k[:, b, :, :n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cache.v[:, b, :, :n], ref.v[:, b, :, :n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close(pair, dtype):
    hf, m32 = pair
    m = ours(hf, m32.cfg).to(dtype)
    p = list(range(1, 20))
    with torch.no_grad():
        c = m.new_cache(1, 32)
        got = m.logits(m.prefill(c, [p])).float()[0]
    ref = hf_last_logits(hf, p)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(pair):
    hf, m = pair
    mc = ours(hf, m.cfg).cuda()
    p = [[1, 2, 3, 4], [5, 6]]
    with torch.no_grad():
        a = m.logits(m.prefill(m.new_cache(2, 16), p))
        b = mc.logits(mc.prefill(mc.new_cache(2, 16), p)).cpu()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
