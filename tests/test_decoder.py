"""Lossless: every preset's and every random tree's output equals greedy AR decoding of each prompt alone."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import tiny_hf, tiny_loaded
from propd import Decoder, PropdError, hookimpl
from propd.strategies.dynamic import DynamicConfig, DynamicSizer
from propd.testing import ar_reference, joined_steps, random_prompts
from propd_oracle import OracleConfig, OracleProposer, RandomPruneConfig, RandomPruner
from strategies_ht import tree_paths

MODEL = tiny_loaded(seed=3, heads=4)


def ar_alone(model, prompt, n):
    return ar_reference(model, [prompt], n)[0]


def prompts_from(seed, lens):
    return random_prompts(MODEL, seed, lens)


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
    for i, ref in enumerate(refs):  # every forward pass is counted once, and gains what it accepted
        assert len(res.accept_lengths[i]) == res.steps[i] and sum(res.accept_lengths[i]) == len(ref)
        assert res.steps[i] == len(ref) if preset == "ar" else 1 <= min(res.accept_lengths[i])


def test_batch_size_chunks_and_progress_give_same_tokens():
    prompts = prompts_from(11, [3, 5, 7, 2, 4])
    dec = Decoder(MODEL, preset="medusa")
    a = dec.generate_ids(prompts, max_new_tokens=12)
    b = dec.generate_ids(prompts, max_new_tokens=12, batch_size=2, progress=True)
    assert a.token_ids == b.token_ids


@given(lens=st.lists(st.integers(1, 14), min_size=2, max_size=9), seed=st.integers(0, 10_000),
       batch=st.integers(1, 4), max_new=st.integers(1, 20), preset=st.sampled_from(["ar", "bpd", "medusa"]),
       stops=st.integers(0, 3))
def test_waiting_prompts_join_as_rows_finish(lens, seed, batch, max_new, preset, stops):
    """With more prompts than ``batch_size``, a waiting prompt takes the place of each row that finishes (on its EOS
    or its budget): the batch never exceeds ``batch_size``, every row equals its greedy AR decoding alone, and fixed
    batches (``continuous=False``) give the same tokens."""
    model = tiny_loaded(seed=3, heads=4, eos=frozenset(range(5, 128, 128 // stops)) if stops else frozenset())
    prompts = random_prompts(model, seed, lens)
    refs = ar_reference(model, prompts, max_new)
    res = Decoder(model, preset=preset).generate_ids(prompts, max_new_tokens=max_new, batch_size=batch)
    assert res.token_ids == refs
    assert max((s.batch_size for s in res.stats), default=0) <= batch
    assert all(len(a) == n for a, n in zip(res.accept_lengths, res.steps)) and all(t >= 0 for t in res.row_wall_time_s)
    fixed = Decoder(model, preset=preset, continuous=False).generate_ids(prompts, max_new_tokens=max_new,
                                                                         batch_size=batch)
    assert fixed.token_ids == refs and joined_steps(fixed.stats) == 0


@given(lens=st.lists(st.integers(1, 14), min_size=1, max_size=6), seed=st.integers(0, 10_000),
       batch=st.integers(1, 3), max_new=st.integers(1, 16), preset=st.sampled_from(["ar", "bpd", "medusa"]),
       stops=st.integers(0, 3))
def test_streamed_tokens_add_up_to_each_prompts_tokens(lens, seed, batch, max_new, preset, stops):
    """``on_tokens(i, ids)`` streams each prompt's tokens in order as steps accept them (several per step from a
    tree, rows joining and leaving on EOS): per prompt they add up to its ``token_ids``, and no call is empty."""
    model = tiny_loaded(seed=3, heads=4, eos=frozenset(range(5, 128, 128 // stops)) if stops else frozenset())
    prompts = random_prompts(model, seed, lens)
    calls = []
    res = Decoder(model, preset=preset).generate_ids(prompts, max_new_tokens=max_new, batch_size=batch,
                                                     on_tokens=lambda i, ids: calls.append((i, list(ids))))
    assert res.token_ids == ar_reference(model, prompts, max_new)
    assert all(ids for _, ids in calls)
    assert [sum((ids for j, ids in calls if j == i), []) for i in range(len(prompts))] == res.token_ids
    if preset != "ar":
        assert max(len(ids) for _, ids in calls) <= 4 + 1  # a step gives at most the tree's depth + the bonus


@given(lens=st.lists(st.integers(1, 14), min_size=1, max_size=5), seed=st.integers(0, 10_000),
       batch=st.integers(1, 3), preset=st.sampled_from(["ar", "bpd", "medusa"]), pattern=st.integers(1, 2),
       at=st.integers(0, 12))
def test_stop_at_ends_each_prompt_where_ar_would(lens, seed, batch, preset, pattern, at):
    """``stop_at`` ends a prompt at the first token after which its tokens end in a pattern (here: the pair of
    tokens at an index of prompt 0's AR answer, so that some prompts stop and others run on), with steps that
    accept several tokens, rows joining and leaving: every prompt's tokens are its AR answer cut there, the streamed
    tokens and the per-step counts add up to them."""
    model = tiny_loaded(seed=3, heads=4)
    prompts = random_prompts(model, seed, lens)
    refs = ar_reference(model, prompts, 16)
    target = refs[0][at:at + pattern] if len(refs[0]) >= at + pattern else refs[0][-pattern:]

    def ends(ids: list[int]) -> int | None:
        return next((n for n in range(pattern, len(ids) + 1) if ids[n - pattern:n] == target), None)

    calls = []
    res = Decoder(model, preset=preset).generate_ids(
        prompts, max_new_tokens=16, batch_size=batch, on_tokens=lambda i, ids: calls.append((i, list(ids))),
        stop_at=lambda i, ids: ends(ids))
    want = [ref[:ends(ref)] if ends(ref) is not None else ref for ref in refs]
    assert res.token_ids == want and ends(res.token_ids[0]) == len(res.token_ids[0])
    assert [sum((ids for j, ids in calls if j == i), []) for i in range(len(prompts))] == want
    assert [sum(a) for a in res.accept_lengths] == res.new_tokens


def test_stop_at_outside_the_new_tokens_is_refused():
    model = tiny_loaded(seed=3)
    with pytest.raises(PropdError, match="stop_at returned 5"):
        Decoder(model, preset="ar").generate_ids([[1, 2, 3]], max_new_tokens=4, stop_at=lambda i, ids: 5)
    with pytest.raises(PropdError, match="stop must be"):
        Decoder(model, preset="ar").generate(["hi"], stop=[""])


def test_a_row_that_ends_makes_room_for_the_next_prompt():
    """Rows of different lengths: with two places and five prompts, later prompts run beside earlier ones, and the
    batch stays full while prompts wait (its size drops only when none is left)."""
    prompts = prompts_from(7, [3, 9, 5, 2, 6])
    budgets = [ar_alone(MODEL, p, 24) for p in prompts]
    stop = budgets[0][3]  # the first row ends early on this token
    model = tiny_loaded(seed=3, heads=4, eos=frozenset({stop}))
    dec = Decoder(model, preset="medusa")
    res = dec.generate_ids(prompts, max_new_tokens=24, batch_size=2)
    assert res.token_ids == [ar_alone(model, p, 24) for p in prompts]
    assert joined_steps(res.stats) > 0
    last_start = next(i for i, s in enumerate(res.stats) if 4 in s.row_ids)
    assert last_start > 0 and all(s.batch_size == 2 for s in res.stats[:last_start])


def test_a_component_with_row_state_but_no_join_gets_fixed_batches():
    """A component that keeps per-row state (``propd_rows_begin``) but does not implement ``propd_rows_join`` turns
    joining off: its rows always start together, and the tokens are the same."""

    class Counter:
        def __init__(self):
            self.begun = []

        @hookimpl
        def propd_rows_begin(self, rows):
            self.begun.append(rows.row_ids)

    prompts = prompts_from(3, [4, 2, 7, 5, 3])
    watcher = Counter()
    dec = Decoder(MODEL, preset="medusa", observers=[watcher])
    assert not dec.continuous
    res = dec.generate_ids(prompts, max_new_tokens=10, batch_size=2)
    assert res.token_ids == [ar_alone(MODEL, p, 10) for p in prompts]
    assert watcher.begun == [(0, 1), (2, 3), (4,)] and joined_steps(res.stats) == 0


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


@given(lens=st.lists(st.integers(1, 14), min_size=1, max_size=6), seed=st.integers(0, 10_000),
       corrupt=st.sampled_from([0.0, 0.2, 1.0]), size=st.sampled_from([2, 5, 9, 17]), prune=st.booleans(),
       max_new=st.integers(1, 20))
def test_per_row_trees_with_absent_nodes_are_lossless(lens, seed, corrupt, size, prune, max_new):
    """Each row drafts a random tree of its own (RowTrees) of a random size within the budget; absent nodes pad it."""
    prompts = prompts_from(seed, lens)
    refs = [ar_alone(MODEL, p, max_new) for p in prompts]
    oracle = OracleProposer(OracleConfig(continuations=dict(enumerate(refs)), corrupt=corrupt, seed=seed,
                                         per_row=True))
    pruners = [RandomPruner(RandomPruneConfig(layer=2, keep=0.6, seed=seed))] if prune else []
    dec = Decoder(MODEL, sizer=("static", {"tree": f"chain:{size - 1}"}), proposer=oracle, pruners=pruners)
    res = dec.generate_ids(prompts, max_new_tokens=max_new)
    assert res.token_ids == refs
    if corrupt == 0.0 and not prune and max_new > 8 and size > 2:
        assert max(a for s in res.stats for a in s.accepted) > 1


class Recorder:
    """A stateful component: checks what the context and the lifecycle hooks tell it against the truth."""

    def __init__(self, prompts, model):
        self.prompts, self.model = prompts, model
        self.state = None  # per live row: its prompt index, as a drafter's per-row cache would follow them
        self.begun, self.left, self.checked = [], [], 0

    @hookimpl
    def propd_rows_begin(self, rows):
        assert self.state is None
        self.state = list(rows.row_ids)
        self.begun.extend(rows.row_ids)
        for b, r in enumerate(rows.row_ids):
            n = len(self.prompts[r])
            assert int(rows.prompt_lengths[b]) == n and rows.prompt_ids[b, :n].tolist() == self.prompts[r]
        # the prompt's last hidden state gives the first token
        last = rows.hidden[torch.arange(len(rows.row_ids)), rows.prompt_lengths - 1]
        assert torch.equal(self.model.model.logits(last).argmax(-1), rows.roots)

    @hookimpl
    def propd_rows_leave(self, keep, left):
        assert sorted(set(self.state) - {self.state[b] for b in keep}) == sorted(left)
        self.left.extend(left)
        self.state = [self.state[b] for b in keep] or None

    @hookimpl
    def propd_after_step(self, ctx, draft, acceptance):
        assert list(ctx.row_ids) == self.state
        n = ctx.accepted_counts
        last = ctx.accepted_hidden.gather(1, (n - 1)[:, None, None].expand(-1, 1, ctx.last_hidden.shape[-1]))[:, 0]
        assert torch.equal(last, ctx.last_hidden)
        for b in range(ctx.batch_size):  # the history is the prompt, then what was generated, the root last
            hist = ctx.history[b, : int(ctx.history_lengths[b])].tolist()
            assert hist[-1] == int(ctx.roots[b]) and hist[: len(self.prompts[ctx.row_ids[b]])] == \
                self.prompts[ctx.row_ids[b]]
            assert len(hist) == len(self.prompts[ctx.row_ids[b]]) + ctx.num_generated[b]
        self.checked += 1


@pytest.mark.parametrize("preset", ["ar", "medusa"])
def test_history_accepted_states_and_row_lifecycle(preset):
    prompts = prompts_from(21, [3, 9, 5, 12])
    refs = [ar_alone(MODEL, p, 16) for p in prompts]
    stop = refs[2][4]
    model = tiny_loaded(seed=3, heads=4, eos=frozenset({stop}))
    rec = Recorder(prompts, model)
    dec = Decoder(model, preset=preset, observers=[rec])
    res = dec.generate_ids(prompts, max_new_tokens=16, batch_size=3)  # two batches; rows leave on EOS and budget
    assert rec.checked == len(res.stats) and sorted(rec.begun) == sorted(rec.left) == [0, 1, 2, 3]
    # the generated history matches the output: check the final history of a row through the verifier's eyes
    assert res.token_ids[2][-1] == stop or len(res.token_ids[2]) == 16


@pytest.mark.parametrize("preset", ["ar", "medusa"])
def test_an_observer_records_every_state_a_forward_pass_gives(preset):
    """``HiddenRecorder`` (an observer) keeps each row's final normed hidden states as the rows decode, prompt then
    accepted paths: for P + N ids, the first P + N - 1 positions of a forward pass over them, at any batch and tree."""
    from propd.training.hidden import HiddenRecorder

    prompts = prompts_from(5, [3, 9, 5, 12])
    rec = HiddenRecorder(dtype=torch.float32)
    dec = Decoder(MODEL, preset=preset, observers=[rec])
    with rec.recording():
        out = dec.generate_ids(prompts, max_new_tokens=10, batch_size=3).token_ids
        states = [rec.take(r, len(p) + len(o) - 1) for r, (p, o) in enumerate(zip(prompts, out))]
    m = MODEL.model
    for p, o, h in zip(prompts, out, states):
        ref, _ = m.hidden_states(m.new_cache(1, len(p + o) + 2), [p + o])
        torch.testing.assert_close(h, ref[0, : len(p + o) - 1], atol=1e-5, rtol=1e-5)
    if preset == "ar":  # one step per token: no state past the output's
        with pytest.raises(RuntimeError, match="hidden states"):
            with rec.recording():
                dec.generate_ids(prompts[:1], max_new_tokens=4)
                rec.take(0, len(prompts[0]) + 4)
    assert dec.generate_ids(prompts, max_new_tokens=10, batch_size=3).token_ids == out  # not recording: no effect


def test_an_observer_takes_no_role():
    class Watcher:
        @hookimpl
        def propd_after_step(self, stats):
            pass

    class Meddler(Watcher):
        @hookimpl
        def propd_verify(self, ctx):
            return None

    Decoder(MODEL, preset="ar", observers=[Watcher()])
    for bad in (Meddler(), object()):
        with pytest.raises(PropdError, match="observer .* must implement one or more of propd_setup"):
            Decoder(MODEL, preset="ar", observers=[bad])


def test_pruners_run_only_at_their_layer_and_must_declare_one():
    calls = []

    class Layer2:
        @hookimpl
        def propd_prune_layer(self):
            return 2

        @hookimpl
        def propd_prune(self, layer, draft):
            calls.append(layer)
            return None

    class NoLayer:
        @hookimpl
        def propd_prune(self, draft):
            return None

    prompts = prompts_from(4, [5, 7])
    dec = Decoder(MODEL, preset="medusa", pruners=[Layer2(), RandomPruner(RandomPruneConfig(layer=1, seed=2))])
    assert dec.generate_ids(prompts, max_new_tokens=8).token_ids == [ar_alone(MODEL, p, 8) for p in prompts]
    assert calls and set(calls) == {2}
    with pytest.raises(PropdError, match="does not implement propd_prune_layer"):
        Decoder(MODEL, preset="medusa", pruners=[NoLayer()])


def test_dynamic_sizer_works_with_any_proposer(monkeypatch):
    """propd-dynamic without Medusa heads, on an oracle's drafts: lossless, and it learns that trees pay. Step times
    are replaced by a fixed cost per size (nearly flat, as trees are where they pay), so that which trees run, and so
    which depths are observed, does not depend on how busy the machine is."""
    from propd.strategies.costs import DriftCostModel

    observe = DriftCostModel.observe
    monkeypatch.setattr(DriftCostModel, "observe",
                        lambda self, size, seconds, now=None: observe(self, size, 0.010 + 0.0001 * size, now))
    model = tiny_loaded(seed=3)
    prompts = prompts_from(8, [4, 6])
    refs = [ar_alone(model, p, 60) for p in prompts]
    oracle = OracleProposer(OracleConfig(continuations=dict(enumerate(refs)), corrupt=0.0, seed=1))
    dec = Decoder(model, sizer="propd-dynamic", proposer=oracle)
    res = dec.generate_ids(prompts, max_new_tokens=60)
    assert res.token_ids == refs
    sizer = next(obj for role, obj in dec.components if role == "sizer")
    prior = DynamicSizer(DynamicConfig())
    prior.propd_setup(model)
    assert sizer.P[1][0] > prior.P[1][0] + 0.3  # learnt from the oracle's drafts alone: no heads to ask
    assert max(a for s in res.stats for a in s.accepted) > 2  # (which sizes it then picks depends on timing)


@given(paths=tree_paths(max_nodes=20), lens=st.lists(st.integers(1, 12), min_size=1, max_size=5),
       seed=st.integers(0, 10_000), per_row=st.booleans(), prune=st.booleans(), max_new=st.integers(1, 16))
def test_static_shape_steps_equal_eager_steps(paths, lens, seed, per_row, prune, max_new):
    """Static shapes (drafts padded to a fixed width, survivors compacted to it on the device, no host sync for their
    count) give the eager steps' tokens, step for step."""
    prompts = prompts_from(seed, lens)
    refs = [ar_alone(MODEL, p, max_new) for p in prompts]
    out = {}
    for static in (False, True):
        oracle = OracleProposer(OracleConfig(continuations=dict(enumerate(refs)), corrupt=0.3, seed=seed,
                                             per_row=per_row))
        pruners = [RandomPruner(RandomPruneConfig(layer=2, keep=0.7, seed=seed))] if prune else []
        dec = Decoder(MODEL, sizer=("static", {"tree": tuple(paths)}), proposer=oracle, pruners=pruners,
                      static_shapes=static)
        res = dec.generate_ids(prompts, max_new_tokens=max_new)
        out[static] = (res.token_ids, [(s.tree_nodes, s.nodes_after_pruning, s.accepted) for s in res.stats])
    assert out[True][0] == out[False][0] == refs
    if not prune:  # (the random pruner draws per node: a wider draft draws other numbers)
        assert out[True][1] == out[False][1]


def test_static_shape_survivors_need_no_sync_and_match():
    from propd.tree import survivors

    g = torch.Generator().manual_seed(0)
    keep = torch.rand(5, 13, generator=g) < 0.5
    keep[:, 0] = True
    eager_idx, eager_valid = survivors(keep, pad_index=13)
    idx, valid = survivors(keep, pad_index=13, width=16)
    assert idx.shape == (5, 16) and torch.equal(idx[:, : eager_idx.shape[1]], eager_idx)
    assert torch.equal(valid[:, : eager_valid.shape[1]], eager_valid) and not valid[:, eager_idx.shape[1]:].any()
    assert (idx[~valid] == 13).all()


@pytest.mark.parametrize("preset", ["medusa", "propd-prune-only"])
def test_static_shapes_with_pruning_presets(preset):
    model = tiny_loaded(seed=4, heads=4, early=(1, 2))
    prompts = prompts_from(13, [3, 7, 5, 11])
    pruners = [("early-topk", {"layer": 1, "k": 6, "min_nodes": 2})] if preset != "medusa" else None
    runs = [Decoder(model, preset=preset, pruners=pruners, static_shapes=s).generate_ids(prompts, max_new_tokens=20)
            for s in (False, True)]
    assert runs[0].token_ids == runs[1].token_ids == [ar_alone(model, p, 20) for p in prompts]
    stats = [[(s.tree_nodes, s.nodes_after_pruning, s.accepted) for s in r.stats] for r in runs]
    assert stats[0] == stats[1]
    if preset != "medusa":
        assert any(s.nodes_after_pruning < s.tree_nodes for s in runs[1].stats)  # it pruned, at a fixed width


@given(n=st.integers(1, 12), data=st.data())
def test_rows_leaving_move_one_row_per_hole_and_keep_every_rows_cache(n, data):
    """``fill_holes`` keeps each staying row in place or moves it from beyond the new size into a hole; the KV cache
    then holds each staying row's committed positions in its new slot (scratch past a row's length is not kept)."""
    from propd.decoder import fill_holes
    from propd.models.cache import KVCache

    done = set(data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n)))
    keep = fill_holes(n, done)
    m = n - len(done)
    assert sorted(keep) == sorted(set(range(n)) - done) and len(keep) == m
    assert all(b == i or (i in done and b >= m) for i, b in enumerate(keep))
    lengths = data.draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    cache = KVCache(2, n, 2, 8, 3, torch.float32, "cpu")
    cache.k.copy_(torch.randn(cache.k.shape))
    cache.v.copy_(torch.randn(cache.v.shape))
    cache.advance(torch.tensor(lengths), lengths)
    k0, v0 = cache.k.clone(), cache.v.clone()
    order = data.draw(st.permutations(keep))  # any order of distinct rows is served
    cache.select_rows(order)
    assert cache.k.shape[1] == m and cache.host_lengths == [lengths[b] for b in order]
    assert cache.lengths.tolist() == cache.host_lengths
    for i, b in enumerate(order):
        torch.testing.assert_close(cache.k[:, i, :, :lengths[b]], k0[:, b, :, :lengths[b]], rtol=0, atol=0)
        torch.testing.assert_close(cache.v[:, i, :, :lengths[b]], v0[:, b, :, :lengths[b]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="distinct"):
        cache.select_rows([0, 0] if m else [1])
    # rows joining: appended after the staying rows, into the freed rows' buffer or a larger one
    k = data.draw(st.integers(1, 4))
    capacity = data.draw(st.sampled_from([4, 8, 12]))
    part = KVCache(2, k, 2, capacity, 3, torch.float32, "cpu")
    part.k.copy_(torch.randn(part.k.shape))
    part.v.copy_(torch.randn(part.v.shape))
    new_lengths = data.draw(st.lists(st.integers(0, capacity - 1), min_size=k, max_size=k))
    part.advance(torch.tensor(new_lengths), new_lengths)
    cache.add_rows(part)
    assert cache.k.shape[1] == m + k and cache.capacity >= capacity
    assert cache.host_lengths == [lengths[b] for b in order] + new_lengths == cache.lengths.tolist()
    for i, b in enumerate(order):
        torch.testing.assert_close(cache.k[:, i, :, :lengths[b]], k0[:, b, :, :lengths[b]], rtol=0, atol=0)
        torch.testing.assert_close(cache.v[:, i, :, :lengths[b]], v0[:, b, :, :lengths[b]], rtol=0, atol=0)
    for j, length in enumerate(new_lengths):
        torch.testing.assert_close(cache.k[:, m + j, :, :length], part.k[:, j, :, :length], rtol=0, atol=0)
        torch.testing.assert_close(cache.v[:, m + j, :, :length], part.v[:, j, :, :length], rtol=0, atol=0)
