"""The EAGLE drafter and proposer: lossless at any batch, its cache in step with the rows, its drafts what a fresh
drafter computes, and its checkpoints in EAGLE's layout."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from propd import Decoder
from propd.errors import PropdError
from propd.hookspecs import hookimpl
from propd.models.eagle import EagleDrafter, is_eagle_checkpoint
from propd.models.llama import LlamaModel
from propd.strategies.eagle import EagleConfig, EagleProposer
from propd.testing import assert_lossless, joined_steps, random_prompts, tiny_model
from propd.tree import DraftTree, RowTrees, tree_paths
from propd.types import Draft, StepContext

MODEL = tiny_model(seed=1, heads=3, early=(1, 2), drafter=True)


@given(lens=st.lists(st.integers(1, 14), min_size=1, max_size=6), seed=st.integers(0, 10_000),
       preset=st.sampled_from(["eagle", "propd-eagle", "propd-eagle-prune-only", "propd-eagle-dynamic-only"]),
       top_k=st.integers(1, 5), depth=st.integers(1, 5), max_new=st.integers(1, 24),
       batch_size=st.sampled_from([None, 1, 2, 4]))
@settings(max_examples=25)
def test_eagle_presets_are_lossless(lens, seed, preset, top_k, depth, max_new, batch_size):
    """Lossless at any batch, with prompts waiting for a place joining as rows finish (``batch_size``)."""
    prompts = random_prompts(MODEL, seed, lens)
    pruners = [("early-topk", {"layer": 2, "k": 4, "min_nodes": 2})] if "prune" in preset or preset == "propd-eagle" \
        else None
    assert_lossless(MODEL, prompts, max_new, batch_size=batch_size, preset=preset, pruners=pruners,
                    proposer=("eagle", {"top_k": top_k, "depth": depth}), entry_points=False)


class Spy(EagleProposer):
    """Records, at each draft, the drafter's root prediction and the history it came from."""

    def __init__(self, config=None):
        super().__init__(config)
        self.seen = []

    def _catch_up(self, ctx):
        g0 = super()._catch_up(ctx)
        self.seen.append((ctx.row_ids, ctx.history.clone(), ctx.lengths.clone(), g0.clone()))
        return g0


def _fresh_pass(model, seq: list[int]) -> torch.Tensor:
    """A fresh drafter's outputs g (N-1, H) over a whole sequence: the base model's features f_0..f_{N-2} with the
    next tokens x_1..x_{N-1}, in one causal pass."""
    m, d = model.model, model.drafter
    f, _ = m.hidden_states(m.new_cache(1, len(seq) + 2), [seq])  # (1, N, H)
    n = len(seq) - 1
    cache = d.new_cache(1, n + 2)
    ar = torch.arange(n)
    a = d.attention_inputs(cache, ar[None], torch.ones(n, n, dtype=torch.bool).tril(), ar)
    return d(f[:, :n], torch.tensor([seq[1:]]), cache, a)[0]


class Alternate:
    """A sizer that drafts at steps 0, 3, 4, 7, 8, ... and runs plain AR steps between (no proposer runs then)."""

    @hookimpl
    def propd_tree(self, ctx):
        from propd.tree import DraftTree, tree_paths

        spec = "budget:8:3" if ctx.step % 4 in (0, 3) else "chain:0"
        return DraftTree.from_paths(tree_paths(spec), device=ctx.device)


@pytest.mark.parametrize("sizer, catch_up, chunk, batch", [
    ("static:tree=budget:8:3", 8, None, None), ("alternate", 8, None, None), ("alternate", 1, None, None),
    ("alternate", 0, None, None), ("alternate", 8, 2, None), ("static:tree=budget:8:3", 8, None, 3),
    ("alternate", 8, None, 2), ("alternate", 0, None, 3), ("alternate", 1, 2, 2)])
def test_drafter_reads_every_committed_token_once_in_order(sizer, catch_up, chunk, batch, monkeypatch):
    """After any mix of tree and 1-node steps, rows leaving and rows joining (``batch``: prompts wait for a place),
    the drafter's prediction for each row's root equals a fresh drafter's pass over that row's prompt and generated
    tokens, whether the steps without a draft are read at the next draft (catch_up 0, or 8 with 2 such steps in a
    row) or between steps (catch_up 1), and whether the prompts are read in one call or in chunks (``chunk``: the
    prefill's chunk size)."""
    if chunk is not None:
        monkeypatch.setattr(LlamaModel, "PREFILL_CHUNK", chunk)
    model = tiny_model(seed=1, drafter=True, eos=frozenset(range(3, 128, 31)))  # rows leave at different steps
    # the torch steps, where the spy sees the read (the one-call draft equals them: test below)
    spy = Spy(EagleConfig(top_k=3, depth=3, dtype="float32", catch_up=catch_up, native=False))
    prompts = random_prompts(model, 4, [5, 2, 9, 1, 3, 7])
    res = Decoder(model, preset=None, sizer=Alternate() if sizer == "alternate" else sizer, proposer=spy,
                  entry_points=False).generate_ids(prompts, max_new_tokens=40, batch_size=batch)
    assert len(spy.seen) >= 3 and len(set(res.new_tokens)) > 1
    if batch is not None:  # rows joined: a step ran rows that started at different steps
        assert max(s.batch_size for s in res.stats) <= batch and joined_steps(res.stats)
    with torch.inference_mode():
        for row_ids, history, lengths, g0 in spy.seen:
            for b in range(len(row_ids)):
                L = int(lengths[b])
                want = _fresh_pass(model, history[b, : L + 1].tolist())[L - 1]
                torch.testing.assert_close(g0[b], want, atol=1e-4, rtol=1e-4)


def test_tree_nodes_are_guessed_as_a_fresh_drafter_would():
    """A depth-2 node's token is among its parent's top-k under a fresh drafter fed the parent's path: the tree
    scratch in the drafter's cache (masks, positions) sees exactly the node's ancestors."""
    k = 3
    prompts = random_prompts(MODEL, 7, [6])
    drafts = []

    class Keep(EagleProposer):
        @hookimpl
        def propd_propose(self, ctx, tree):
            d = EagleProposer.propd_propose(self, ctx, tree)
            drafts.append((ctx.history.clone(), int(ctx.lengths[0]), d))
            return d

    prop = Keep(EagleConfig(top_k=k, depth=3, dtype="float32"))
    Decoder(MODEL, preset=None, sizer="static:tree=budget:40:3", proposer=prop, entry_points=False).generate_ids(
        prompts, max_new_tokens=6)
    d = MODEL.drafter
    with torch.inference_mode():
        history, L, draft = drafts[-1]
        seq = history[0, : L + 1].tolist()
        g = _fresh_pass(MODEL, seq)  # predictions up to the root's feature (index L-1)
        parents = draft.rows.parents[0].tolist()
        tokens = draft.tokens[0].tolist()
        depths = draft.rows.depths[0].tolist()
        checked = 0
        for i in range(1, len(tokens)):
            if depths[i] != 2:
                continue
            p = parents[i]
            # the parent's own prediction: the drafter fed (g of the root, parent's token) after the sequence
            f, _ = MODEL.model.hidden_states(MODEL.model.new_cache(1, L + 2), [seq])
            feats = torch.cat([f[:, :L], g[L - 1][None, None]], dim=1)
            cache = d.new_cache(1, L + 3)
            ar = torch.arange(L + 1)
            a = d.attention_inputs(cache, ar[None], torch.ones(L + 1, L + 1, dtype=torch.bool).tril(), ar)
            gp = d(feats, torch.tensor([seq[1:] + [tokens[p]]]), cache, a)[0, L]
            top = d.draft_logits(gp)[0].topk(k).indices.tolist()
            assert tokens[i] in top
            checked += 1
        assert checked >= 1


class Record(EagleProposer):
    """Records every draft, and how many went through the extension's one-call path."""

    def __init__(self, config=None):
        super().__init__(config)
        self.drafts, self.native_calls = [], 0

    def _native_args(self, *args):
        out = super()._native_args(*args)
        self.native_calls += out is not None
        return out

    @hookimpl
    def propd_propose(self, ctx, tree):
        draft = EagleProposer.propd_propose(self, ctx, tree)
        self.drafts.append(draft)
        return draft


@given(lens=st.lists(st.integers(1, 12), min_size=1, max_size=4), seed=st.integers(0, 10_000),
       dtype=st.sampled_from(["float32", "q8", "bfloat16"]), vocab=st.sampled_from([None, 1, 40]),
       top_k=st.integers(1, 4), depth=st.integers(1, 4), nodes=st.integers(2, 12),
       sizer=st.sampled_from(["static", "alternate"]), catch_up=st.sampled_from([0, 1, 8]),
       batch_size=st.sampled_from([None, 2]))
@settings(max_examples=20, deadline=None)
def test_one_call_drafts_equal_the_torch_steps(lens, seed, dtype, vocab, top_k, depth, nodes, sizer, catch_up,
                                               batch_size):
    """On a CPU with the extension a draft (the read of the committed tokens, the expansion, the reranking) is one
    call (``eagle_draft``); its tokens, parents, probabilities and confidences equal the torch steps' bit for bit,
    over a draft vocabulary or the whole one, in every drafter dtype, with reads of several steps' tokens and rows
    joining."""
    from propd.models import cpu_kernel

    if cpu_kernel.extension() is None:
        pytest.skip("the one-call draft needs propd's CPU extension")
    model = tiny_model(seed=2, drafter=True)
    if vocab is not None:
        model.drafter.set_draft_vocab(list(range(seed % 7, 128, 3))[:vocab])
    prompts = random_prompts(model, seed, lens)
    runs = []
    for native in (True, False):
        rec = Record(EagleConfig(top_k=top_k, depth=depth, dtype=dtype, catch_up=catch_up, native=native))
        tree = f"static:tree=budget:{nodes}:{min(depth, nodes - 1)}"
        res = Decoder(model, preset=None, sizer=Alternate() if sizer == "alternate" else tree, proposer=rec,
                      entry_points=False).generate_ids(prompts, max_new_tokens=16, batch_size=batch_size)
        runs.append((rec, res))
    (one, res_one), (steps, res_steps) = runs
    assert one.native_calls == len(one.drafts) >= 1 and steps.native_calls == 0
    assert res_one.token_ids == res_steps.token_ids and len(one.drafts) == len(steps.drafts)
    for a, b in zip(one.drafts, steps.drafts):
        for x, y in ((a.tokens, b.tokens), (a.rows.parents, b.rows.parents), (a.probs, b.probs),
                     (a.confidence, b.confidence)):
            assert x.dtype == y.dtype and torch.equal(x, y)


def test_one_call_drafts_follow_a_changed_drafter():
    """The one-call path keeps its arguments between drafts only while the drafter's and the base model's tensors
    are the same ones, unchanged: after a new draft vocabulary and weights changed in place, the same decoders'
    drafts still equal the torch steps'."""
    from propd.models import cpu_kernel

    if cpu_kernel.extension() is None:
        pytest.skip("the one-call draft needs propd's CPU extension")
    model = tiny_model(seed=3, drafter=True)
    model.drafter.set_draft_vocab(list(range(0, 128, 2)))
    prompts = random_prompts(model, 11, [5, 8])
    recs = [Record(EagleConfig(top_k=3, depth=3, dtype="float32", native=native)) for native in (True, False)]
    decs = [Decoder(model, preset=None, sizer="static:tree=budget:6:3", proposer=r, entry_points=False) for r in recs]

    def drafts_equal():
        for r in recs:
            r.drafts.clear()
        outs = [dec.generate_ids(prompts, max_new_tokens=12).token_ids for dec in decs]
        assert outs[0] == outs[1] and recs[0].drafts and len(recs[0].drafts) == len(recs[1].drafts)
        return all(torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs)
                   for a, b in zip(recs[0].drafts, recs[1].drafts))

    assert drafts_equal()
    model.drafter.set_draft_vocab(list(range(1, 128, 5)))  # a new draft_ids buffer
    assert drafts_equal() and all(int(t) % 5 == 1 for d in recs[0].drafts for t in d.tokens[:, 1:].flatten())
    with torch.no_grad():
        model.drafter.fc.weight.mul_(-1.5)  # the same tensor, changed in place
    assert drafts_equal()


def test_fused_drafter_layer_equals_its_modules_and_q8_drafts_stay_close():
    """On a CPU with the extension the drafter's layer runs as one fused call that skips the input norm EAGLE's layer
    lacks: the same bits as its modules one by one. Its ``"q8"`` copy (Q8_0 weights, 8-bit activations) predicts
    features close to the float32 drafter's."""
    from propd.models import cpu_kernel
    from propd.models.cpu_modules import KernelDecoderLayer
    from propd.models.llama import DecoderLayer
    from propd.models.quant import QuantLinear

    d = MODEL.drafter
    if cpu_kernel.extension() is None or d.device.type != "cpu":
        pytest.skip("the fused layer and 8-bit products need propd's CPU extension")
    d.prepare()
    layer = d.layers[0]
    assert type(layer) is KernelDecoderLayer
    g = torch.Generator().manual_seed(3)
    H, n = d.cfg.hidden_size, 5
    x = torch.randn(1, n, H, generator=g)
    ar = torch.arange(n)
    outs = []
    with torch.inference_mode():
        for fused in (True, False):
            cache = d.new_cache(1, n + 2)
            a = d.attention_inputs(cache, ar[None], torch.ones(n, n, dtype=torch.bool).tril(), ar)
            assert (layer._fused_weights(x, cache.layer(0)[0], a.decoding) is not None) == True  # noqa: E712
            outs.append(layer(x, 0, cache, a) if fused else DecoderLayer.forward(layer, x, 0, cache, a))
        assert torch.equal(outs[0], outs[1])
        q8 = d.in_dtype("q8")
        assert q8.q8 and q8.dtype == torch.float32 and isinstance(q8.layers[0].mlp.down_proj, QuantLinear)
        assert d.in_dtype("q8") is q8 and q8.in_dtype("q8") is q8
        f = torch.randn(1, n, H, generator=g)
        tok = torch.randint(0, d.cfg.vocab_size, (1, n), generator=g)
        gs = []
        for m in (d, q8):
            cache = m.new_cache(1, n + 2)
            a = m.attention_inputs(cache, ar[None], torch.ones(n, n, dtype=torch.bool).tril(), ar)
            gs.append(m(f, tok, cache, a))
    cos = torch.nn.functional.cosine_similarity(gs[0], gs[1], dim=-1)
    assert bool((cos > 0.99).all()), cos


def test_q8_drafter_keeps_float_products_where_rows_are_not_whole_blocks():
    """A drafter whose products are not all whole Q8_0 blocks (hidden size 48) or carry a bias keeps those in float:
    mixed products in one fused layer, still lossless."""
    from propd.models import cpu_kernel
    from propd.models.quant import QuantLinear

    if cpu_kernel.extension() is None:
        pytest.skip("the 8-bit drafter needs propd's CPU extension")
    m = tiny_model(seed=2, heads=2, early=(1, 2), drafter=True, hidden_size=48, head_dim=12)
    q = m.drafter.in_dtype("q8")
    kinds = {name: isinstance(mod, QuantLinear) for name, mod in q.named_modules() if name.endswith("proj")}
    assert kinds["layers.0.mlp.down_proj"] and not kinds["layers.0.self_attn.q_proj"]
    prompts = random_prompts(m, 3, [5, 9, 3])
    for preset in ("eagle", "propd-eagle"):
        assert_lossless(m, prompts, 16, preset=preset, entry_points=False)


def test_a_new_draft_vocabulary_reaches_the_drafters_copies_in_other_dtypes():
    """``set_draft_vocab`` after ``in_dtype`` made a copy: the copy asked for again guesses among the new tokens."""
    m = tiny_model(seed=4, heads=2, early=(1, 2), drafter=True)
    d = m.drafter
    d.set_draft_vocab(list(range(10)))
    g = torch.randn(1, 2, d.cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.inference_mode():
        assert d.in_dtype(torch.bfloat16).draft_logits(g)[0].shape[-1] == 10
        d.set_draft_vocab([3, 5, 7])
        logits, ids = d.in_dtype(torch.bfloat16).draft_logits(g)
    assert logits.shape[-1] == 3 and ids.tolist() == [3, 5, 7]


def test_eagle_needs_a_drafter():
    with pytest.raises(PropdError, match="EAGLE drafter"):
        Decoder(tiny_model(seed=0), preset="eagle", entry_points=False)


def test_checkpoint_round_trip_in_eagle_layout(tmp_path):
    d = MODEL.drafter
    d.save(tmp_path, dtype=torch.float32)
    (tmp_path / "draft_vocab.json").write_text(json.dumps({"ids": list(range(0, 128, 2))}))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["bias"] is True
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert "fc.weight" in keys and "layers.0.self_attn.q_proj.weight" in keys
    assert not any("input_layernorm" in k for k in keys)  # EAGLE's layer 0 has none
    assert is_eagle_checkpoint(tmp_path)
    back = EagleDrafter.load(tmp_path, MODEL.config)
    for k, v in d.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    assert back.draft_ids.tolist() == list(range(0, 128, 2))


def test_published_layout_with_embeddings_and_bin_loads(tmp_path):
    """EAGLE's own files: pytorch_model.bin with an ``embed_tokens.weight`` and a ``model.`` prefix-free layout."""
    d = MODEL.drafter
    d.save(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = {k: v.clone() for k, v in d.state_dict().items()}
    state["embed_tokens.weight"] = torch.zeros(MODEL.config.vocab_size, MODEL.config.hidden_size)
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = tiny_model(seed=1)
    model.load_heads(tmp_path)
    assert model.drafter is not None and model.heads is None
    prompts = random_prompts(model, 1, [4, 7])
    assert_lossless(model, prompts, 12, preset="eagle", entry_points=False)


def test_mismatched_drafter_is_refused(tmp_path):
    MODEL.drafter.save(tmp_path)
    other = tiny_model(seed=0, hidden_size=32, num_heads=2, num_kv_heads=1)
    with pytest.raises(PropdError, match="hidden size"):
        EagleDrafter.load(tmp_path, other.config)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    del state["fc.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(PropdError, match="missing fc.weight"):
        EagleDrafter.load(tmp_path, MODEL.config)


def test_bias_free_drafter_saves_a_zero_bias(tmp_path):
    """propd trains fc without a bias and saves a zero one, which every engine reads the same way."""
    import attrs

    d = EagleDrafter(attrs.evolve(MODEL.config, num_layers=1), bias=False)
    d.save(tmp_path)
    back = EagleDrafter.load(tmp_path, MODEL.config)
    assert back.fc.bias is not None and not back.fc.bias.any()
    torch.testing.assert_close(back.fc.weight, d.fc.weight)


def test_eagle_inside_a_composite_is_lossless_and_kept_in_step():
    """As a part of ``composite`` the drafter still reads every committed token (through the composite's hooks)."""
    prompts = random_prompts(MODEL, 3, [3, 9, 1, 5])
    assert_lossless(MODEL, prompts, 24, sizer="static:tree=budget:12:3",
                    proposer=("composite", {"parts": ["eagle:dtype=float32", "medusa"]}), entry_points=False)


class ChainPart:
    """A proposer that fills whatever budget it is given with a chain of tokens ``start``, ``start + 1``, ...;
    records the budgets it saw."""

    def __init__(self, start: int):
        self.start, self.seen = start, []

    @hookimpl
    def propd_propose(self, ctx, tree):
        self.seen.append((tree.num_nodes, tree.max_depth))
        chain = DraftTree.chain(tree.num_nodes - 1)
        guesses = torch.arange(self.start, self.start + tree.num_nodes - 1).expand(ctx.batch_size, -1)
        return Draft(tokens=torch.cat([ctx.roots[:, None], guesses], dim=1), tree=chain)


class RowPart(ChainPart):
    """A ChainPart that drafts for ``rows`` only (the other rows' nodes are absent)."""

    def __init__(self, start: int, rows: list[int]):
        super().__init__(start)
        self.rows = rows

    @hookimpl
    def propd_propose(self, ctx, tree):
        d = super().propd_propose(ctx, tree)
        present = torch.zeros(d.tokens.shape, dtype=torch.bool)
        present[:, 0] = True
        present[self.rows] = True
        return Draft(tokens=d.tokens, tree=RowTrees.from_parents(d.rows.parents), present=present)


def test_composite_budgets_cap_each_parts_share():
    """budgets=[3, 2] in a 6-node budget: the first part drafts in 3 nodes, the second in 2, the merged tree has
    1 + 2 + 1 nodes; without budgets each part drafts in all 6 and the first fills the tree."""
    from propd.strategies.composite import CompositeConfig, CompositeProposer

    def ctx_for(roots):
        B = len(roots)
        z = torch.zeros(B, dtype=torch.long)
        return StepContext(step=0, row_ids=tuple(range(B)), lengths=z, host_lengths=(0,) * B,
                           num_generated=(1,) * B, roots=torch.tensor(roots), last_hidden=torch.zeros(B, 4),
                           vocab_size=MODEL.model.cfg.vocab_size, device=torch.device("cpu"))

    tree = DraftTree.from_paths(tree_paths("budget:6:4"))
    for budgets, seen, nodes in (((3, 2), [(3, 2), (2, 1)], 4), ((), [(6, 4), (6, 4)], 6)):
        comp = CompositeProposer(CompositeConfig(parts=("a", "b"), budgets=budgets))
        comp.parts, comp.names, comp.vocab_size = [ChainPart(10), ChainPart(20)], ["a", "b"], MODEL.model.cfg.vocab_size
        draft = comp.propd_propose(ctx_for([1, 2]), tree)
        assert [p.seen[0] for p in comp.parts] == seen
        assert draft.present.sum(dim=1).tolist() == [nodes, nodes]
        assert draft.tokens[0][draft.present[0]].tolist()[:3] == [1, 10, 11]  # the first part's chain comes first
    for bad in ((3,), (3, 0)):
        with pytest.raises(PropdError, match="composite budgets"):
            CompositeProposer(CompositeConfig(parts=("a", "b"), budgets=bad))
    # later="empty": the second part drafts only for rows the first left empty, and not at all when none is
    comp = CompositeProposer(CompositeConfig(parts=("a", "b"), budgets=(3, 2), later="empty"))
    comp.parts, comp.names, comp.vocab_size = [RowPart(10, rows=[0]), ChainPart(20)], ["a", "b"], 64
    draft = comp.propd_propose(ctx_for([1, 2]), tree)
    assert draft.tokens[0][draft.present[0]].tolist() == [1, 10, 11]  # row 0: the first part's chain alone
    assert draft.tokens[1][draft.present[1]].tolist() == [2, 20]  # row 1: the second part's
    comp.parts[0].rows = [0, 1]
    comp.parts[1].seen.clear()
    comp.propd_propose(ctx_for([1, 2]), tree)
    assert comp.parts[1].seen == []  # every row had a draft: the second part was not asked


def test_eagle_with_capped_parts_is_lossless():
    prompts = random_prompts(MODEL, 5, [4, 12, 2])
    prompts = [p + p[: len(p) // 2 + 1] for p in prompts]  # something for the lookup-like first part to repeat
    res = assert_lossless(MODEL, prompts, 24, sizer="static:tree=budget:7:2", entry_points=False,
                          proposer=("composite", {"parts": ["medusa", "eagle:dtype=float32,top_k=4"],
                                                  "budgets": [5, 3]}))
    assert max(s.tree_nodes for s in res.stats) <= 7


class BadPart:
    """A proposer whose drafts do not start at the roots."""

    @hookimpl
    def propd_propose(self, ctx, tree):
        return torch.zeros(ctx.batch_size, tree.num_nodes, dtype=torch.long) + 1


def test_composite_names_the_part_at_fault():
    from propd.plugins import Registry

    class Plugin:
        @staticmethod
        @hookimpl
        def propd_register_components(register):
            register("proposer", "bad-part", lambda cfg: BadPart(), None, "")

    reg = Registry(extra_plugins=[Plugin], entry_points=False)
    assert "bad-part" in reg.names("proposer")
    dec = Decoder(MODEL, preset=None, sizer="static:tree=chain:2", plugins=[Plugin], entry_points=False,
                  proposer=("composite", {"parts": ["medusa", "bad-part"]}))
    with pytest.raises(PropdError, match="proposer 'composite' part 'bad-part' returned tokens whose column 0"):
        dec.generate_ids([[1, 2, 3]], max_new_tokens=4)
