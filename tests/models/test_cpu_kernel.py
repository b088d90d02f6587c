"""propd's packed CPU kernel for few-row float32 and bfloat16 linear layers (propd.models.cpu_kernel)."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from propd.models import cpu_kernel
from propd.models.cpu_modules import KernelLinear as Linear
from propd.models.cpu_modules import torch_linear

X86_AVX2 = cpu_kernel.supported()


def test_the_kernel_builds_where_it_can_run():
    """On an x86-64 CPU with AVX2 (this project's CI machine) the extension must compile and load: a broken build
    would otherwise pass every other test silently on the MKL fallback."""
    if not X86_AVX2:
        assert cpu_kernel.extension() is None
        return
    assert cpu_kernel.extension() is not None


def test_a_killed_builds_lock_file_is_cleared_and_a_partial_module_rebuilt(tmp_path):
    """torch's builder waits forever on a lock file ("baton") a killed build left; propd removes it under its own OS
    lock before building, and rebuilds a module file that does not load."""
    d = tmp_path / "ext"
    d.mkdir()
    (d / "lock").write_text("")
    calls = []

    def build():
        assert not (d / "lock").exists()
        calls.append(1)
        return "module"

    assert cpu_kernel.load_or_build(d, "propd_fake_ext", build) == "module" and calls == [1]
    (d / "propd_fake_ext.so").write_bytes(b"\x7fELF truncated")  # a killed link's partial file
    assert cpu_kernel.load_or_build(d, "propd_fake_ext", build) == "module" and calls == [1, 1]
    assert not (d / "propd_fake_ext.so").exists()


@pytest.mark.skipif(not X86_AVX2, reason="the CPU kernel needs x86-64 with AVX2/FMA; this machine lacks them")
def test_a_built_extension_loads_beside_a_stale_lock_file(tmp_path):
    """A built module is imported without torch's builder, so a stale baton beside it cannot block (in a subprocess:
    one process cannot load two copies of the module)."""
    import shutil
    import subprocess
    import sys

    ext = cpu_kernel.extension()
    assert ext is not None
    so = Path(ext.__file__)
    d = tmp_path / so.stem
    d.mkdir()
    shutil.copy(so, d / so.name)
    (d / "lock").write_text("")
    code = ("import sys; from pathlib import Path; from propd.models import cpu_kernel; "
            f"m = cpu_kernel.load_or_build(Path({str(d)!r}), {so.stem!r}, lambda: sys.exit('built again')); "
            "assert m.isa() in ('avx2', 'avx512', 'avx512bf16', 'avx512bf16-amx'), m.isa()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 140), k=st.integers(1, 70), out=st.integers(1, 70), seed=st.integers(0, 1000),
       dtype=st.sampled_from(cpu_kernel.DTYPES))
def test_packed_product_equals_matmul_and_each_row_alone(rows, k, out, seed, dtype):
    if not X86_AVX2:  # test_the_kernel_builds_where_it_can_run checks that it is refused
        pytest.skip("the CPU kernel needs x86-64 with AVX2/FMA; this machine lacks them")
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, k, generator=g).to(dtype), torch.randn(out, k, generator=g).to(dtype)
    packed = cpu_kernel.pack(w)
    y = cpu_kernel.linear(x, packed, out)
    assert y.shape == (rows, out) and y.is_contiguous() and y.dtype == dtype
    exact = x.double().matmul(w.double().t())
    if dtype == torch.float32:
        torch.testing.assert_close(y, exact.float(), rtol=1e-5, atol=1e-4)
    else:  # float32 products and sums of the bf16 values, rounded once: within one bf16 rounding of the exact result
        torch.testing.assert_close(y.double(), exact, rtol=2**-8, atol=1e-3)
        # weights widened in registers (the path without AVX512-BF16): the float32 kernel's sums on the widened
        # values, rounded as torch rounds
        ext = cpu_kernel.extension()
        ext.set_isa_limit(1)
        try:
            widened = cpu_kernel.linear(x, cpu_kernel.pack(w), out)
        finally:
            ext.set_isa_limit(0)
        assert torch.equal(widened, cpu_kernel.linear(x.float(), cpu_kernel.pack(w.float()), out).to(dtype))
    for r in range(rows):  # batch invariance: a row's result does not depend on the other rows, bit for bit
        assert torch.equal(cpu_kernel.linear(x[r:r + 1].contiguous(), packed, out)[0], y[r])


def test_linear_uses_the_kernel_for_few_rows_and_repacks_after_a_weight_change():
    torch.manual_seed(0)
    proj = Linear(40, 70, bias=True)
    with torch.no_grad():
        x = torch.randn(5, 40)
        first = proj(x)
        p = proj.packed()
        if not X86_AVX2:
            assert p is None
            torch.testing.assert_close(first, torch.nn.functional.linear(x, proj.weight, proj.bias))
            return
        assert p is not None and proj.packed() is p  # packed once, then reused
        torch.testing.assert_close(first, torch.nn.functional.linear(x, proj.weight, proj.bias), rtol=1e-5, atol=1e-5)
        assert torch.equal(first, cpu_kernel.linear(x, p, 70) + proj.bias)  # the kernel computed it
        proj.weight.mul_(2)  # in-place change (as load_state_dict does): the packed copy is stale
        torch.testing.assert_close(proj(x) - proj.bias, 2 * (first - proj.bias), rtol=1e-5, atol=1e-5)
        assert proj.packed() is not p
        # float32: the kernel up to its row bound on this machine's ISA, torch's products above
        bound = cpu_kernel.max_rows(torch.float32)
        assert bound == cpu_kernel.ROW_BOUNDS["avx512" if cpu_kernel.isa().startswith("avx512") else "avx2"]
        most = torch.randn(bound + 1, 40)
        assert torch.equal(proj(most[:-1]), cpu_kernel.linear(most[:-1], proj.packed(), 70) + proj.bias)
        assert torch.equal(proj(most), torch_linear(most, proj.weight, proj.bias, most.shape[0]))


def test_linear_keeps_autograd_and_falls_back_when_turned_off(monkeypatch):
    torch.manual_seed(1)
    proj = Linear(24, 30, bias=False)
    x = torch.randn(3, 24, requires_grad=True)
    proj(x).sum().backward()  # the kernel has no backward: with gradients on, the MKL path runs
    torch.testing.assert_close(x.grad, proj.weight.sum(0).expand(3, 24))
    monkeypatch.setenv("PROPD_CPU_KERNEL", "0")
    assert not cpu_kernel.enabled()


def test_memory_cap_refuses_to_pack(monkeypatch):
    monkeypatch.setenv("PROPD_CPU_KERNEL_MAX_GB", "0")
    assert cpu_kernel.pack(torch.randn(32, 32)) is None
    proj = Linear(32, 32, bias=False)
    x = torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), x @ proj.weight.t(), rtol=1e-5, atol=1e-5)  # MKL serves instead


def test_bfloat16_linear_uses_the_kernel():
    torch.manual_seed(2)
    proj = Linear(48, 40, bias=True).to(torch.bfloat16)
    x = torch.randn(3, 48).to(torch.bfloat16)
    with torch.no_grad():
        y = proj(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.double(), x.double() @ proj.weight.double().t() + proj.bias.double(),
                                   rtol=2**-7, atol=2e-2)
        p = proj.packed()
        if not X86_AVX2:
            assert p is None
            return
        assert p.dtype == torch.bfloat16 and torch.equal(y, cpu_kernel.linear(x, p, 40) + proj.bias)
        many = torch.randn(200, 48).to(torch.bfloat16)  # bf16 goes to the kernel at any row count (prefill too)
        assert torch.equal(proj(many), cpu_kernel.linear(many, p, 40) + proj.bias)


def test_a_decoder_packs_the_weights_before_the_first_step():
    """The first decoding step must not pay for packing: a tree sizer would time it and price that size wrongly."""
    from propd.decoder import Decoder
    from conftest import tiny_loaded

    loaded = tiny_loaded(heads=2)
    loaded.heads.set_draft_vocab(list(range(20)))
    linears = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and not any(hasattr(m, "_packed") for m in linears)
    Decoder(loaded, preset="ar")  # prepare(): the CPU kernel modules swapped in, and their weights packed
    assert all(isinstance(m, Linear) for m in linears)
    proj = loaded.heads._draft_projection(20)
    if not X86_AVX2:
        assert not any(hasattr(m, "_packed") for m in linears + [proj])
        return
    for m in linears + [proj]:  # packed now, and the same packed copy serves the forward later
        assert m._packed[1] is not None and m.packed() is m._packed[1]


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), hk=st.integers(1, 3), group=st.integers(1, 4), t=st.integers(1, 16),
       s=st.integers(1, 150), d=st.sampled_from([8, 16, 64, 72, 128]), seed=st.integers(0, 1000),
       dtype=st.sampled_from(cpu_kernel.DTYPES))
def test_attention_equals_sdpa_and_each_query_alone(b, hk, group, t, s, d, seed, dtype):
    if not X86_AVX2:
        pytest.skip("the CPU kernel needs x86-64 with AVX2/FMA; this machine lacks them")
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    S = s + t
    kc, vc = torch.randn(b, hk, S + 9, d, generator=g).to(dtype), torch.randn(b, hk, S + 9, d, generator=g).to(dtype)
    kc[:, :, S:] = vc[:, :, S:] = float("nan")  # slots past the keys read: must never leak into the result
    q = torch.randn(b, hk * group, t, d, generator=g).to(dtype)
    mask = torch.rand(b, t, S, generator=g) > 0.4
    mask[..., 0] = True  # every query sees at least one key
    k, v = kc[:, :, :S], vc[:, :, :S]
    assert cpu_kernel.attention_fits(q, k)
    out = cpu_kernel.attention(q, k, v, mask, d ** -0.5)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask[:, None],
                                         enable_gqa=True).transpose(1, 2).reshape(b, t, -1)
    assert out.shape == (b, t, hk * group * d) and out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2e-2)
    torch.testing.assert_close(out.double(), ref, **tol)
    if dtype == torch.bfloat16:  # bf16 is the float32 computation on the widened values, rounded once as torch rounds
        wide = cpu_kernel.attention(q.float(), k.float(), v.float(), mask, d ** -0.5)
        assert torch.equal(out, wide.to(torch.bfloat16))
    ext = cpu_kernel.extension()  # both paths (where the CPU has AVX-512, scores and values can run 16 lanes wide)
    chosen = ext.attention_wide()
    ext.set_attention_wide(True)
    ext.set_isa_limit(1)
    try:
        assert torch.equal(cpu_kernel.attention(q, k, v, mask, d ** -0.5), out)
        ext.set_isa_limit(0)
        assert torch.equal(cpu_kernel.attention(q, k, v, mask, d ** -0.5), out)
    finally:
        ext.set_isa_limit(0)
        ext.set_attention_wide(chosen)
    # bit for bit: a query alone, a row alone, and more keys that are all masked give the same result
    for i in range(t):
        alone = cpu_kernel.attention(q[:, :, i:i + 1].contiguous(), k, v, mask[:, i:i + 1], d ** -0.5)
        assert torch.equal(alone[:, 0], out[:, i])
    assert torch.equal(cpu_kernel.attention(q[-1:].contiguous(), k[-1:], v[-1:], mask[-1:], d ** -0.5), out[-1:])
    wider = torch.cat([mask, torch.zeros(b, t, 9, dtype=torch.bool)], dim=-1)
    assert torch.equal(cpu_kernel.attention(q, kc, vc, wider, d ** -0.5), out)
    # and the same keys side by side, masked ones left out (a tree node's ancestors among masked siblings against the
    # AR step that sees only the path): the same bits
    for bi in range(b):
        for i in range(t):
            keep = mask[bi, i].nonzero()[:, 0]
            n = keep.numel()
            packed = cpu_kernel.attention(q[bi:bi + 1, :, i:i + 1].contiguous(), k[bi:bi + 1, :, keep].contiguous(),
                                          v[bi:bi + 1, :, keep].contiguous(), torch.ones(1, 1, n, dtype=torch.bool),
                                          d ** -0.5)
            assert torch.equal(packed[0, 0], out[bi, i])


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 20), hk=st.integers(1, 3), group=st.integers(1, 3),
       d=st.sampled_from([4, 16, 24, 64, 128]), seed=st.integers(0, 1000), dtype=st.sampled_from(cpu_kernel.DTYPES))
def test_rope_and_cache_equals_torch_bit_for_bit(b, t, hk, group, d, seed, dtype):
    if not X86_AVX2:
        pytest.skip("the CPU kernel needs x86-64 with AVX2/FMA; this machine lacks them")
    from propd.models.llama import _rotate_half

    g = torch.Generator().manual_seed(seed)
    hq, cap = hk * group, t + 10
    q, k, v = (torch.randn(b, t, h * d, generator=g).to(dtype) for h in (hq, hk, hk))
    cos, sin = (torch.randn(b, 1, t, d, generator=g).to(dtype) for _ in range(2))
    pos = torch.stack([torch.randperm(cap, generator=g)[:t] for _ in range(b)])
    kc, vc = torch.randn(2, b, hk, cap, d, generator=g).to(dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    out = cpu_kernel.rope_and_cache(q, k, v, cos, sin, kc, vc, pos)
    # torch's element-wise ops, as Attention computes them without the kernel
    qt, kt, vt = (x.view(b, t, -1, d).transpose(1, 2) for x in (q, k, v))
    ref_q = qt * cos + _rotate_half(qt) * sin
    ref_k = kt * cos + _rotate_half(kt) * sin
    idx = pos[:, None, :, None].expand_as(ref_k)
    kc2.scatter_(2, idx, ref_k)
    vc2.scatter_(2, idx, vt)
    assert out.shape == (b, hq, t, d) and torch.equal(out, ref_q)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 70), n=st.sampled_from([8, 64, 576]), seed=st.integers(0, 1000),
       dtype=st.sampled_from(cpu_kernel.DTYPES))
def test_rms_norm_matches_the_module_and_each_row_alone(rows, n, seed, dtype):
    if not X86_AVX2:
        pytest.skip("the CPU kernel needs x86-64 with AVX2/FMA; this machine lacks them")
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=g) * 3).to(dtype)
    w = torch.randn(n, generator=g).to(dtype)
    y = cpu_kernel.rms_norm(x, w, 1e-5)
    xf = x.double()
    ref = w.double() * (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-6, atol=1e-2)
    torch.testing.assert_close(y.double(), ref, **tol)
    for r in range(rows):  # a row's result does not depend on the other rows, bit for bit
        assert torch.equal(cpu_kernel.rms_norm(x[r:r + 1], w, 1e-5)[0], y[r])


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 8), t=st.integers(1, 16), seed=st.integers(0, 1000), dtype=st.sampled_from(cpu_kernel.DTYPES))
def test_fused_decoder_layer_equals_the_module_path_bit_for_bit(b, t, seed, dtype):
    """A decoding step through the model's ``LayerStack`` (all layers in one call, here split in two calls at a
    random layer), through ``cpu_kernel.decoder_layer`` (one call per layer) and through the modules gives the same
    hidden states and the same cache, bit for bit; a weight changed in place reaches every path. Up to 8 x 16 rows:
    steps within ``cpu_kernel.max_rows`` take the fused path."""
    if not X86_AVX2:
        pytest.skip("the CPU kernel needs x86-64 with AVX2/FMA; this machine lacks them")

    from conftest import tiny_loaded
    from propd.models.cpu_modules import KernelDecoderLayer as DecoderLayer
    from propd.tree import DraftTree

    model = tiny_loaded(seed=seed % 7).model.to(dtype)
    model.prepare()  # the CPU kernel modules
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 128, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (b,), generator=g)]
    tree = DraftTree.chain(t - 1)
    tokens = torch.randint(0, 128, (b, t), generator=g)
    split = seed % (model.num_layers + 1)
    stack_runner = model.__dict__["fused_layers"]
    for changed in (False, True):
        if changed:  # in place, as a training step or a test would: every cached form must see it
            with torch.no_grad():
                model.model.layers[-1].post_attention_layernorm.weight.mul_(1.5)
        outs = []
        for way in ("stack", "layers", "modules"):
            cache = model.new_cache(b, 40)
            with torch.inference_mode():
                model.prefill(cache, prompts)
                a = model.attention_inputs(cache, torch.arange(t).expand(b, t), tree.mask, tree.depths)
                x = model.embed(tokens)
                if way == "stack":
                    assert model.model.layers[0]._fused_weights(x, cache.layer(0)[0]) is not None
                    h = model.run_layers(model.run_layers(x, 0, split, cache, a), split, model.num_layers, cache, a)
                    assert any(entry[1] is not None for entry in model.__dict__["_stacks"].values())
                    outs.append((h, cache.k.clone(), cache.v.clone()))
                    continue
                model.__dict__["fused_layers"] = None
                original = DecoderLayer._fused_weights
                if way == "modules":
                    DecoderLayer._fused_weights = lambda self, x, k, decoding=True: None
                try:
                    h = model.run_layers(x, 0, model.num_layers, cache, a)
                finally:
                    DecoderLayer._fused_weights = original
                    model.__dict__["fused_layers"] = stack_runner
            outs.append((h, cache.k.clone(), cache.v.clone()))
        for h, k, v in outs[1:]:
            assert torch.equal(outs[0][0], h) and torch.equal(outs[0][1], k) and torch.equal(outs[0][2], v)
        if not changed:
            before = outs[0][0]
    assert not torch.equal(before, outs[0][0])  # the change mattered, and the stack saw it


HAS_AVX512 = X86_AVX2 and cpu_kernel.extension() is not None and cpu_kernel.extension().isa().startswith("avx512")
HAS_BF16_PAIRS = HAS_AVX512 and cpu_kernel.extension().isa() in ("avx512bf16", "avx512bf16-amx")
HAS_AMX = HAS_AVX512 and cpu_kernel.extension().isa() == "avx512bf16-amx"


@pytest.mark.skipif(not X86_AVX2 or cpu_kernel.extension() is None, reason="the CPU kernel needs x86-64 with AVX2/FMA")
@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), hk=st.integers(1, 3), group=st.integers(1, 3), t=st.integers(1, 45),
       before=st.sampled_from([0, 0, 1, 17, 64]), d=st.sampled_from([64, 128]), seed=st.integers(0, 1000))
def test_causal_attention_equals_sdpa_and_each_row_alone(b, hk, group, t, before, d, seed):
    """A prefill chunk's causal attention (positions ``before`` .. ``before + t - 1`` over keys [0, S)), on the AVX2
    path and (where the CPU has it) the AVX-512 one: SDPA's result with the causal mask, a batch row's result its own
    alone, and nothing read past the keys."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    S = before + t
    kc, vc = torch.randn(b, hk, S + 5, d, generator=g), torch.randn(b, hk, S + 5, d, generator=g)
    kc[:, :, S:] = vc[:, :, S:] = float("nan")  # the cache past the chunk: must never leak into the result
    q = torch.randn(b, hk * group, t, d, generator=g)
    k, v = kc[:, :, :S], vc[:, :, :S]
    assert cpu_kernel.causal_fits(q, k)
    mask = torch.arange(S)[None, :] <= before + torch.arange(t)[:, None]  # (t, S)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                         enable_gqa=True).transpose(1, 2).reshape(b, t, -1)
    for limit in (1, 0) if HAS_AVX512 else (1,):
        out = _under(limit, lambda: cpu_kernel.causal_attention(q, k, v, d ** -0.5))
        assert out.shape == (b, t, hk * group * d) and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        alone = _under(limit, lambda: cpu_kernel.causal_attention(q[-1:], k[-1:], v[-1:], d ** -0.5))
        assert torch.equal(alone, out[-1:])
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()  # bfloat16: widened, the result rounded once
    assert cpu_kernel.causal_fits(qb, kb)
    outb = cpu_kernel.causal_attention(qb, kb, vb, d ** -0.5)
    refb = F.scaled_dot_product_attention(qb.double(), kb.double(), vb.double(), attn_mask=mask,
                                          enable_gqa=True).transpose(1, 2).reshape(b, t, -1)
    assert outb.dtype == torch.bfloat16
    torch.testing.assert_close(outb.double(), refb, rtol=2 ** -7, atol=1e-2)


@pytest.mark.skipif(not X86_AVX2 or cpu_kernel.extension() is None, reason="the CPU kernel needs x86-64 with AVX2/FMA")
def test_a_long_prefill_takes_the_causal_kernel_in_every_chunk(monkeypatch):
    """Prompts longer than a prefill chunk: every chunk of rows without padding is causal (the extension's causal
    kernel above the decoding kernel's query count), and the prefill's last hidden states match the SDPA path's."""
    from propd.models.llama import LlamaModel
    from propd.testing import tiny_model

    model = tiny_model(seed=3, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=64).model
    model.prepare()
    monkeypatch.setattr(LlamaModel, "PREFILL_CHUNK", 24)
    calls = []
    real = cpu_kernel.causal_attention
    monkeypatch.setattr(cpu_kernel, "causal_attention", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    prompts = [[(7 * i + 3) % 120 + 5 for i in range(60)], [(5 * i + 1) % 120 + 5 for i in range(60)]]
    last = model.prefill(model.new_cache(2, 64), prompts)
    assert calls == [24, 24] * model.num_layers  # (12: the decoding kernel's)
    monkeypatch.setattr(cpu_kernel, "causal_fits", lambda *a: False)
    ref_cache = model.new_cache(2, 64)
    torch.testing.assert_close(model.prefill(ref_cache, prompts), last, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_AVX512, reason="this CPU has no AVX-512F: every step takes the row-invariant kernel")
@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), hk=st.integers(1, 3), group=st.integers(1, 3), t=st.integers(1, 16),
       s=st.integers(1, 90), d=st.sampled_from([64, 128]), pad=st.booleans(), seed=st.integers(0, 1000))
def test_a_float32_step_without_invariance_takes_the_tiles_and_equals_sdpa(b, hk, group, t, s, d, pad, seed):
    """``cpu_kernel.attention(..., invariant=False)`` (float32 steps of 4+ tokens: the causal kernel's tiles over a
    tree mask): SDPA's result, never reading the slots no query sees (left NaN here: unwritten cache, a shorter row's
    tail, the padding slot), and the row-invariant kernel's result below 4 tokens, bit for bit."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    S = s + t + 1  # prefix, tree, padding slot
    kc, vc = torch.randn(b, hk, S + 5, d, generator=g), torch.randn(b, hk, S + 5, d, generator=g)
    mask = torch.zeros(b, t, S, dtype=torch.bool)
    for i in range(b):
        n = s - i % 2 * min(s - 1, 3)  # the second row is shorter: its last prefix slots are unwritten
        mask[i, :, :n] = True
        mask[i, :, s:s + t] = (torch.rand(t, t, generator=g) < 0.5) | torch.eye(t, dtype=torch.bool)
        kc[i, :, n:s] = vc[i, :, n:s] = float("nan")
    if pad:  # the last query of the first row is padding: it sees its slot only
        mask[0, -1] = False
        mask[0, -1, -1] = True
    unseen = ~mask.any(1)  # (b, S)
    for i in range(b):
        kc[i, :, :S][:, unseen[i]] = vc[i, :, :S][:, unseen[i]] = float("nan")
    kc[:, :, S:] = vc[:, :, S:] = float("nan")
    q = torch.randn(b, hk * group, t, d, generator=g)
    k, v = kc[:, :, :S], vc[:, :, :S]
    out = cpu_kernel.attention(q, k, v, mask, d ** -0.5, invariant=False)
    ref = F.scaled_dot_product_attention(q.double(), k.nan_to_num().double(), v.nan_to_num().double(),
                                         attn_mask=mask[:, None], enable_gqa=True).transpose(1, 2).reshape(b, t, -1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    if t < 4:
        assert torch.equal(out, cpu_kernel.attention(q, k, v, mask, d ** -0.5))


@pytest.mark.skipif(not X86_AVX2 or cpu_kernel.extension() is None, reason="the CPU kernel needs x86-64 with AVX2/FMA")
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), batch=st.integers(1, 3), preset=st.sampled_from(["bpd", "medusa", "propd"]))
def test_presets_on_64_wide_heads_equal_ar(seed, batch, preset):
    """On heads of 64 values (the default model's) float32 tree steps of 4+ nodes take the tiled attention on AVX-512
    CPUs: every preset still gives greedy AR's tokens, row by row."""
    from propd.testing import assert_lossless, random_prompts, tiny_model

    model = tiny_model(seed=seed % 7, heads=4, early=(1, 2), hidden_size=128, num_heads=4, num_kv_heads=2,
                       head_dim=64)
    prompts = random_prompts(model, seed, [5 + 7 * i for i in range(batch)])
    assert_lossless(model, prompts, 24, preset=preset, entry_points=False)


def _under(limit: int, fn, isa: str | None = None):
    """``fn()`` while the kernel is limited to ``limit`` (0: the best path; 1: AVX2; 2: AVX-512 without AMX), which
    ``isa()`` then reads as ``isa`` where given."""
    ext = cpu_kernel.extension()
    ext.set_isa_limit(limit)
    try:
        assert isa is None or ext.isa() == isa
        return fn()
    finally:
        ext.set_isa_limit(0)


def _packed_under(limit: int, w: torch.Tensor) -> torch.Tensor:
    """``w`` packed while the kernel is limited to ``limit``: the layout follows the path."""
    return _under(limit, lambda: cpu_kernel.pack(w))


@pytest.mark.skipif(not HAS_AVX512, reason="this CPU has no AVX-512F: the kernel has one path (AVX2)")
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), k=st.integers(1, 70), out=st.integers(1, 70), seed=st.integers(0, 1000),
       dtype=st.sampled_from(cpu_kernel.DTYPES))
def test_avx512_paths_equal_the_avx2_path(rows, k, out, seed, dtype):
    """The AVX-512F path (chosen at run time by CPUID) computes each output with the same chain of FMAs as the AVX2
    path: float32 results agree bit for bit, so a machine's ISA never changes propd's float32 output. bf16 weights on
    a CPU with AVX512-BF16 take pairs of products per instruction (vdpbf16ps): the same values up to the rounding of
    the sums, and still each row independent of the others, bit for bit."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, k, generator=g).to(dtype), torch.randn(out, k, generator=g).to(dtype)
    wide_w, narrow_w = _packed_under(0, w), _packed_under(1, w)
    wide = cpu_kernel.linear(x, wide_w, out)
    narrow = _under(1, lambda: cpu_kernel.linear(x, narrow_w, out), isa="avx2")
    pairs = dtype == torch.bfloat16 and HAS_BF16_PAIRS
    assert wide_w.shape[-1] == (32 if pairs else 16)
    if pairs:
        torch.testing.assert_close(wide.float(), narrow.float(), rtol=2 ** -7, atol=1e-5)
        alone = torch.cat([cpu_kernel.linear(x[i: i + 1].contiguous(), wide_w, out) for i in range(rows)])
        assert torch.equal(alone, wide)
    else:
        assert torch.equal(wide, narrow)


@pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX-BF16: bf16 products have no tile path")
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), k=st.integers(1, 90), out=st.integers(1, 70), seed=st.integers(0, 1000))
def test_amx_path_equals_the_avx512bf16_path_up_to_rounding(rows, k, out, seed):
    """bf16 products on AMX tiles (every row count, blocks of up to 16 rows, pairs of k left over past 16 pairs in
    their own tiles) give the vdpbf16ps path's values up to the rounding of the sums, and each row's result alone
    equals its result among the others, bit for bit."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, k, generator=g).bfloat16(), torch.randn(out, k, generator=g).bfloat16()
    packed = cpu_kernel.pack(w)  # the same pair layout serves both paths
    tiles = cpu_kernel.linear(x, packed, out)
    pairs = _under(2, lambda: cpu_kernel.linear(x, packed, out), isa="avx512bf16")
    torch.testing.assert_close(tiles.float(), pairs.float(), rtol=2 ** -7, atol=1e-5)
    alone = torch.cat([cpu_kernel.linear(x[i: i + 1].contiguous(), packed, out) for i in range(rows)])
    assert torch.equal(alone, tiles)


@pytest.mark.skipif(not HAS_AVX512, reason="this CPU has no AVX-512F: the kernel has one path (AVX2)")
def test_decoding_is_identical_on_both_paths():
    from propd import Decoder
    from propd.testing import random_prompts, tiny_model

    ext = cpu_kernel.extension()
    out = {}
    try:
        for limit in (0, 1):  # float32: a fresh model per path, packed under it
            ext.set_isa_limit(limit)
            model = tiny_model(seed=3, heads=4, hidden_size=128, intermediate_size=256)
            prompts = random_prompts(model, 1, [5, 9, 3])
            out[limit] = Decoder(model, preset="medusa").generate_ids(prompts, max_new_tokens=16).token_ids
    finally:
        ext.set_isa_limit(0)
    assert out[0] == out[1]


@pytest.mark.skipif(not X86_AVX2 or cpu_kernel.extension() is None,
                    reason="bf16 losslessness rests on the CPU extension's row-invariant kernels (x86-64 with AVX2)")
@settings(max_examples=8, deadline=None)
@given(lens=st.lists(st.integers(1, 30), min_size=1, max_size=5), seed=st.integers(0, 100),
       preset=st.sampled_from(["bpd", "medusa", "propd-dynamic-only"]), batch=st.sampled_from([1, 2, 5]))
def test_bfloat16_presets_equal_ar(lens, seed, preset, batch):
    """In bfloat16 every preset gives `ar`'s tokens: a token's logits do not depend on the tree size, its place in the
    tree or the rows beside it, since decoding steps run on kernels whose per-row results do not depend on them."""
    from propd import Decoder
    from propd.testing import random_prompts, tiny_model

    model = tiny_model(seed=seed, heads=4, hidden_size=128, intermediate_size=256)
    model.model.to(torch.bfloat16)
    model.heads.to(torch.bfloat16)
    prompts = random_prompts(model, seed, lens)
    ar = Decoder(model, preset="ar")
    refs = [ar.generate_ids([p], max_new_tokens=20).token_ids[0] for p in prompts]
    got = Decoder(model, preset=preset).generate_ids(prompts, max_new_tokens=20, batch_size=batch).token_ids
    assert got == refs


@pytest.mark.skipif(not X86_AVX2 or cpu_kernel.extension() is None, reason="the CPU kernel needs x86-64 with AVX2/FMA")
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), v=st.integers(1, 300), seed=st.integers(0, 1000), dtype=st.sampled_from(cpu_kernel.DTYPES),
       ties=st.booleans(), special=st.sampled_from(["none", "nan", "-inf", "+inf"]), threads=st.sampled_from([1, 2, 3]))
def test_argmax_equals_torch(rows, v, seed, dtype, ties, special, threads):
    """The extension's argmax is torch.argmax(dim=-1): the first index among equal maxima (values drawn from a few
    levels make ties), the first NaN where a row holds one, and -inf/+inf as torch orders them, however the rows
    and their parts are split over the threads."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 2, v, generator=g)
    if ties:
        x = (x * 2).round()
    if special != "none":
        hit = torch.rand(rows, 2, v, generator=g) < 0.05
        x[hit] = float(special.replace("none", "0"))
    x = x.to(dtype)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_kernel.argmax(x)
    finally:
        torch.set_num_threads(old)
    assert got.shape == (rows, 2) and got.dtype == torch.long
    assert torch.equal(got, x.argmax(dim=-1))


def test_argmax_of_a_long_row_split_over_threads():
    x = torch.full((1, 49152), -1.0)
    x[0, 30000] = x[0, 40000] = 2.0  # equal maxima in different parts of the row: the first wins
    assert cpu_kernel.argmax(x).item() == (30000 if cpu_kernel.extension() is not None else x.argmax().item())
    x[0, 45000] = float("nan")
    assert cpu_kernel.argmax(x).item() == 45000
    assert cpu_kernel.argmax(x[:, ::2]).item() == x[:, ::2].argmax().item()  # strided: torch's


@pytest.mark.skipif(not X86_AVX2 or cpu_kernel.extension() is None, reason="the CPU kernel needs x86-64 with AVX2/FMA")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_layer_stack_step_that_fails_raises_and_the_next_one_runs(threads):
    """A step's layers run in one parallel region whose other threads take their shares from thread 0: an error in
    thread 0 (here a write position outside the cache) leaves the region as a RuntimeError, no thread waits on, and
    the next step gives the same result as before, at any thread count."""
    from propd.models.cpu_modules import _layer_inputs
    from propd.testing import tiny_model

    model = tiny_model(seed=5, heads=0, hidden_size=64, intermediate_size=128).model
    model.prepare()
    cache = model.new_cache(1, 40)
    model.prefill(cache, [[3, 4, 5, 6, 7]])
    layers = model.model.layers
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            T = 4
            a = model.attention_inputs(cache, torch.arange(T).expand(1, T), torch.tril(torch.ones(T, T, dtype=torch.bool)),
                                       torch.arange(T))
            x = model.embed(torch.tensor([[8, 9, 10, 11]]))
            fused = [layer._fused_weights(x, cache.layer(0)[0]) for layer in layers]
            eps, scale = layers[0].input_layernorm.eps, layers[0].self_attn.cfg.head_dim ** -0.5
            stack = cpu_kernel.extension().LayerStack([w for f in fused for w in f[0]], fused[0][1], eps, scale, [])
            cos, sin, pos, msk = _layer_inputs(a)
            before = stack.run(x.contiguous(), cos, sin, cache.k, cache.v, pos, msk, 0, len(layers))
            with pytest.raises(RuntimeError, match="outside the cache"):
                stack.run(x.contiguous(), cos, sin, cache.k, cache.v, pos + 1000, msk, 0, len(layers))
            again = stack.run(x.contiguous(), cos, sin, cache.k, cache.v, pos, msk, 0, len(layers))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(before, again)


@pytest.mark.skipif(not X86_AVX2, reason="needs propd's CPU extension (x86-64 with AVX2)")
@settings(deadline=None, max_examples=80, derandomize=True)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 4), T=st.integers(1, 9), Tq=st.integers(1, 9),
       per_row=st.booleans(), pad=st.booleans(), extra=st.integers(0, 3))
def test_tree_mask_is_the_torch_definition(seed, B, T, Tq, per_row, pad, extra):
    """``cpu_kernel.tree_mask`` (one call) gives ``tree_mask_torch``'s mask, query positions and write positions
    exactly: shared and per-row trees, padding nodes (index T), rows of different lengths, keys past the tree."""
    from propd.models.llama import tree_mask_torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 12, (B,), generator=g)
    S = int(lengths.max()) + T + 1 + extra
    node_idx = torch.randint(0, T + 1 if pad else T, (B, Tq), generator=g)
    shape = (B, T, T) if per_row else (T, T)
    mask = torch.rand(*shape, generator=g) < 0.5
    depths = torch.randint(0, T, shape[:-1], generator=g)
    got = cpu_kernel.tree_mask(lengths, S, node_idx, mask, depths)
    want = tree_mask_torch(lengths, S, node_idx, mask, depths)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
