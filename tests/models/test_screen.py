"""The lm_head's argmax screen (propd.models.screen) gives the full float32 kernel's argmax bit for bit."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from propd.models import cpu_kernel
from propd.models.screen import ArgmaxScreen

pytestmark = pytest.mark.skipif(cpu_kernel.extension() is None, reason="needs propd's CPU extension")


def full_argmax(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return cpu_kernel.linear(x.contiguous(), cpu_kernel.pack(w), w.shape[0]).argmax(dim=1)


@settings(deadline=None, max_examples=60, derandomize=True)
@given(seed=st.integers(0, 10_000), V=st.integers(1, 300), K=st.sampled_from([32, 64, 96]),
       rows=st.integers(1, 6), ties=st.integers(0, 4), scale=st.sampled_from([0.01, 1.0, 30.0]),
       cap=st.sampled_from([1, 4, 256]), cluster=st.booleans())
def test_screen_equals_the_full_argmax(seed, V, K, rows, ties, scale, cap, cluster):
    """Random weights with near-ties and exact ties (copied rows, rows nudged by one ulp, or every row a small
    perturbation of one, where 8-bit rounding reorders the logits): the screen's argmax is the full product's, also
    when rows have more candidates than ``cap`` (they take the full product)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, K, generator=g) * scale
    if cluster:
        w = w[:1] + 1e-3 * w
    for i in range(min(ties, V - 1)):
        src, dst = torch.randint(V, (2,), generator=g).tolist()
        w[dst] = w[src] if i % 2 else torch.nextafter(w[src], torch.full_like(w[src], float("inf")))
    x = torch.randn(rows, K, generator=g) * torch.rand(rows, 1, generator=g) * 5
    screen = ArgmaxScreen(w, max_candidates=cap)
    full = lambda xs: cpu_kernel.linear(xs.contiguous(), cpu_kernel.pack(w), V)  # noqa: E731
    assert screen.argmax(x, full).tolist() == full_argmax(w, x).tolist()


@settings(deadline=None, max_examples=60, derandomize=True)
@given(seed=st.integers(0, 10_000), V=st.integers(1, 300), K=st.sampled_from([32, 64, 576]),
       rows=st.integers(1, 6), spread=st.sampled_from([0.0, 1e-4, 3e-3, 1.0]), scale=st.sampled_from([0.01, 1.0, 30.0]),
       cap=st.sampled_from([4, 1024]))
def test_bfloat16_screen_equals_the_full_argmax(seed, V, K, rows, spread, scale, cap):
    """A bfloat16 weight: its logits are float32 sums rounded to bfloat16, so ids whose sums differ round to one
    maximum (rows of a cluster ``spread`` apart, below and around a bfloat16 ulp); the screen keeps every id that
    can tie and returns the full bfloat16 product's argmax, the lowest id among equal maxima."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(V, K, generator=g)
    w = ((base[:1] + spread * base) if spread < 1 else base).mul(scale).to(torch.bfloat16)
    x = (torch.randn(rows, K, generator=g) * torch.rand(rows, 1, generator=g) * 5).to(torch.bfloat16)
    screen = ArgmaxScreen(w, max_candidates=cap)
    full = lambda xs: cpu_kernel.linear(xs.contiguous(), cpu_kernel.pack(w), V)  # noqa: E731
    logits = full(x)
    assert logits.dtype == torch.bfloat16
    assert screen.argmax(x, full).tolist() == logits.argmax(dim=1).tolist()


@settings(deadline=None, max_examples=30, derandomize=True)
@given(seed=st.integers(0, 10_000), V=st.integers(1, 300), rows=st.integers(1, 5), cluster=st.booleans())
def test_two_pass_candidates_are_the_per_block_bounds(seed, V, rows, cluster):
    """The coarse pass keeps every candidate of the per-block bound e_v (module docstring), and the second pass
    leaves exactly those: the set computed from the definition over the whole vocabulary."""
    g = torch.Generator().manual_seed(seed)
    K = 96
    w = torch.randn(V, K, generator=g)
    if cluster:
        w = w[:1] + 1e-3 * w
    x = torch.randn(rows, K, generator=g) * 3
    screen = ArgmaxScreen(w)
    approx = screen.q8(x)
    xq, dx, _, _ = cpu_kernel.quantize_rows_q8(x)
    xb = x.view(rows, K // 32, 32)
    l2 = (xb - xq.view(rows, K // 32, 32).float() * dx[..., None]).norm(dim=2)
    e = torch.cat([xb.abs().sum(dim=2), l2], dim=1) @ screen.coef.T  # (N, V), every id
    want = (approx + e) >= (approx - e).amax(dim=1, keepdim=True)
    ids, cand, finite = screen._candidates(x)
    got = torch.zeros(rows, V, dtype=torch.bool)
    got[:, ids] = cand
    assert finite.all() and torch.equal(got, want)


def test_screen_on_ties_takes_the_lowest_id_and_skips_non_finite_rows():
    w = torch.randn(50, 64)
    w[7] = w[31] = w[3] * 4  # equal rows: equal logits
    x = torch.stack([w[3], torch.full((64,), float("nan")), w[3]])
    calls = []

    def full(xs):
        calls.append(xs.shape[0])
        return cpu_kernel.linear(xs.contiguous(), cpu_kernel.pack(w), 50)

    got = ArgmaxScreen(w).argmax(x, full)
    want = full_argmax(w, x)
    assert got[0].item() == got[2].item() == want[0].item() == 7 and got[1].item() == want[1].item()
    assert calls == [1]  # only the NaN row took the full product


def test_model_argmax_uses_the_screen_and_equals_the_logits():
    from propd.testing import tiny_model

    m = tiny_model(seed=5, hidden_size=64, head_dim=16).model
    m.prepare()
    m.prepare_screen()
    h = torch.randn(2, 3, 64)
    most = torch.randn(4, m.SCREEN_ROWS // 4, 64)  # as many rows as the screen serves
    torch.testing.assert_close(m.screened_argmax(most), m.logits(most).argmax(dim=-1), rtol=0, atol=0)
    assert m.screened_argmax(torch.randn(4, m.SCREEN_ROWS // 4 + 1, 64)) is None  # above SCREEN_ROWS
    torch.testing.assert_close(m.screened_argmax(h), m.logits(h).argmax(dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(m.argmax(h), m.logits(h).argmax(dim=-1), rtol=0, atol=0)
    with torch.no_grad():
        m.lm_head.weight.mul_(-1)  # changed in place: the screen is stale and must not serve
    assert m.screened_argmax(h) is None
    torch.testing.assert_close(m.argmax(h), m.logits(h).argmax(dim=-1), rtol=0, atol=0)


def test_a_bfloat16_model_screens_its_lm_head():
    """A bfloat16 model's decoder builds the screen; its argmax equals the bfloat16 logits' at up to SCREEN_ROWS
    rows, and greedy decoding gives the same tokens with and without it."""
    from propd import Decoder
    from propd.testing import random_prompts, tiny_model

    lm = tiny_model(seed=5, hidden_size=64, head_dim=16)
    lm.model.to(torch.bfloat16)
    m = lm.model
    m.prepare()
    m.__dict__.pop("_screen", None)
    dec = Decoder(lm, preset="ar", entry_points=False)
    assert m.__dict__["_screen"] is not None and m.__dict__["_screen"][1].weight.dtype == torch.bfloat16
    h = torch.randn(4, m.SCREEN_ROWS // 4, 64).to(torch.bfloat16)
    assert torch.equal(m.screened_argmax(h), m.logits(h).argmax(dim=-1))
    assert m.screened_argmax(h.float()) is None  # not the weight's dtype
    prompts = random_prompts(lm, 5, [3, 9, 5])
    screened = dec.generate_ids(prompts, max_new_tokens=16).token_ids
    m.__dict__["_screen"] = None
    assert dec.generate_ids(prompts, max_new_tokens=16).token_ids == screened


@settings(deadline=None, max_examples=60, derandomize=True)
@given(seed=st.integers(0, 10_000), N=st.integers(1, 6), V=st.integers(1, 70), special=st.integers(0, 4))
def test_the_coarse_pass_is_the_torch_expression(seed, N, V, special):
    """``cpu_kernel.screen_survivors`` keeps the ids of the torch expression it replaces, bit for bit: ties at the
    floor, infinities, and NaNs (a row whose floor is NaN admits no id) included; V not a multiple of 8 too."""
    g = torch.Generator().manual_seed(seed)
    approx = torch.randn(N, V, generator=g) * 3
    l1, l2 = torch.rand(N, generator=g), torch.rand(N, generator=g)
    err, norm = torch.rand(V, generator=g) * 0.1, torch.rand(V, generator=g) * 0.1
    for i in range(special):
        n, v = torch.randint(N, (1,), generator=g).item(), torch.randint(V, (1,), generator=g).item()
        approx[n, v] = [float("nan"), float("inf"), float("-inf"), approx[n].max().item()][i % 4]
    coarse = l1[:, None] * err
    coarse += l2[:, None] * norm
    want = ((approx + coarse) >= (approx - coarse).amax(dim=1, keepdim=True)).any(dim=0).nonzero()[:, 0]
    assert torch.equal(cpu_kernel.screen_survivors(approx, l1, l2, err, norm), want)


@settings(deadline=None, max_examples=40, derandomize=True)
@given(seed=st.integers(0, 10_000), V=st.integers(1, 200), K=st.sampled_from([32, 64, 576]),
       scale=st.sampled_from([1e-3, 1.0, 40.0]), zeros=st.integers(0, 3))
def test_screen_tables_are_the_torch_definitions(seed, V, K, scale, zeros):
    """``cpu_kernel.screen_tables`` (one pass) gives the torch reference's Q8_0 blocks and weight errors bit for
    bit (quantize_q8_0's rounding, blocks of zeros included) and its block norms to float32 rounding (another
    summation order; the bound's 2e-4 slack covers it)."""
    from propd.models.screen import ROUNDING, reference_tables

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, K, generator=g) * scale
    w[: min(zeros, V), :32] = 0  # all-zero blocks: d = 0
    blocks, coef, err_max, norm_max = cpu_kernel.screen_tables(w, ROUNDING)
    ref_blocks, ref_coef, ref_err, ref_norm = reference_tables(w)
    nb = K // 32
    assert torch.equal(blocks, ref_blocks)
    assert torch.equal(coef[:, :nb], ref_coef[:, :nb]) and torch.equal(err_max, ref_err)
    torch.testing.assert_close(coef[:, nb:], ref_coef[:, nb:], rtol=1e-6, atol=0)
    torch.testing.assert_close(norm_max, ref_norm, rtol=1e-6, atol=0)
