"""GGUF weights kept as blocks (``dtype="gguf"``, propd.models.quant): dequantized in registers by the CPU extension,
bit for bit what the float32 model computes on the dequantized weights."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from propd.errors import PropdError
from propd.models import cpu_kernel, quant

KERNEL = cpu_kernel.supported() and cpu_kernel.extension() is not None
needs_kernel = pytest.mark.skipif(not KERNEL, reason="GGUF blocks run on the CPU extension (x86-64 with AVX2)")
HAS_AVX512 = KERNEL and cpu_kernel.extension().isa().startswith("avx512")


def random_blocks(fmt: str, rows: int, cols: int, g: torch.Generator, scale: float = 0.05) -> torch.Tensor:
    """(rows, cols / 32 * block bytes) ggml blocks: random quants, scales d in [0, scale), Q4_1 offsets about -7.5 d
    (weights centred on 0, as a quantized model's are)."""
    nb, bb = cols // quant.QK, quant.BLOCK_BYTES[fmt]
    raw = torch.randint(0, 256, (rows, nb, bb), dtype=torch.uint8, generator=g)
    d = torch.rand(rows, nb, 1, generator=g) * scale
    parts = [d]
    if fmt == "Q4_1":
        parts.append(-7.5 * d * (1 + 0.2 * (torch.rand(rows, nb, 1, generator=g) - 0.5)))
    head = torch.cat(parts, dim=-1).half().view(torch.uint8).reshape(rows, nb, -1)
    raw[..., : head.shape[-1]] = head
    return raw.reshape(rows, -1)


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(["Q4_1", "Q8_0"]), rows=st.integers(1, 40), nb=st.integers(1, 4), seed=st.integers(0, 999))
def test_dequantize_equals_gguf_and_packing_keeps_every_weight(fmt, rows, nb, seed):
    from gguf import GGMLQuantizationType, dequantize

    blocks = random_blocks(fmt, rows, 32 * nb, torch.Generator().manual_seed(seed))
    want = torch.from_numpy(np.ascontiguousarray(dequantize(blocks.numpy(), GGMLQuantizationType[fmt])))
    got = quant.dequantize_blocks(blocks, fmt, rows, 32 * nb)
    assert torch.equal(got, want.reshape(rows, 32 * nb))
    packed = quant.pack_blocks(blocks, fmt, rows, 32 * nb)
    assert packed.shape == (-(-rows // 16), nb, quant.PANEL_BYTES[fmt])
    assert torch.equal(quant.dequantize_packed(packed, fmt, rows, 32 * nb), got)
    if KERNEL:  # the extension's packing and dequantize (load, prefill) give the same bytes and bits
        assert torch.equal(packed, quant.pack_blocks_reference(blocks, fmt, rows, 32 * nb))
        assert torch.equal(cpu_kernel.dequantize(packed, rows), got)


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(["Q4_1", "Q8_0"]), m=st.one_of(st.integers(1, 4), st.integers(1, 64)),
       out=st.one_of(st.integers(1, 50), st.integers(64, 150)), nb=st.integers(1, 5),
       seed=st.integers(0, 999), threads=st.sampled_from([1, 2, 3]))
def test_block_kernel_equals_the_float32_kernel_on_every_path(fmt, m, out, nb, seed, threads):
    """y = x W^T from blocks equals the float32 kernel's on the dequantized W bit for bit, on the AVX-512 and AVX2
    paths, and each row alone equals its row in the batch, whatever the thread count (each thread's range of panels
    ends in a group of one to four panels side by side)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _block_kernel_equals_the_float32_kernel(fmt, m, out, nb, seed)
    finally:
        torch.set_num_threads(old)


def _block_kernel_equals_the_float32_kernel(fmt, m, out, nb, seed):
    ext = cpu_kernel.extension()
    g = torch.Generator().manual_seed(seed)
    blocks = random_blocks(fmt, out, 32 * nb, g)
    w = quant.dequantize_blocks(blocks, fmt, out, 32 * nb)
    packed = quant.pack_blocks(blocks, fmt, out, 32 * nb)
    x = torch.randn(m, 32 * nb, generator=g)
    want = cpu_kernel.linear(x, cpu_kernel.pack(w), out)
    assert torch.equal(cpu_kernel.linear(x, packed, out), want)
    torch.testing.assert_close(want, x @ w.t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(cpu_kernel.linear(x[-1:].contiguous(), packed, out), want[-1:])
    ext.set_isa_limit(1)
    try:
        assert torch.equal(cpu_kernel.linear(x, packed, out), want)
    finally:
        ext.set_isa_limit(0)


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(["Q4_1", "Q8_0"]), m=st.one_of(st.integers(1, 2), st.integers(1, 70)),
       out=st.integers(1, 160), nb=st.integers(1, 5), seed=st.integers(0, 999))
def test_8bit_activation_kernel_equals_its_reference_on_every_path(fmt, m, out, nb, seed):
    """``gguf-q8``'s products (llama.cpp's arithmetic): the extension's packing, activation rounding and products
    equal the torch reference bit for bit, on the AVX512-VNNI path where the CPU has it and on the AVX2 path, for
    any number of rows (prefill included), each row alone as in the batch; and they stay close to x W^T."""
    ext = cpu_kernel.extension()
    g = torch.Generator().manual_seed(seed)
    blocks = random_blocks(fmt, out, 32 * nb, g)
    packed = quant.pack_blocks(blocks, fmt, out, 32 * nb, activations="q8")
    assert packed.dtype == torch.int8 and packed.shape == (-(-out // 16), nb, quant.Q8_PANEL_BYTES[fmt])
    assert torch.equal(packed, quant.pack_for_q8(blocks, fmt, out, 32 * nb))
    w = quant.dequantize_blocks(blocks, fmt, out, 32 * nb)
    assert torch.equal(quant.dequantize_packed(packed, fmt, out, 32 * nb), w)
    assert torch.equal(cpu_kernel.dequantize(packed, out), w)
    x = torch.randn(m, 32 * nb, generator=g) * torch.rand(m, 1, generator=g) * 4
    x[0, :32] = 0.0  # an all-zero block: dx = 0
    xq, dx, sx, qsum = cpu_kernel.quantize_rows_q8(x)
    rq, rdx, rsx = quant.quantize_activations(x)
    assert torch.equal(xq.float(), rq) and torch.equal(dx, rdx) and torch.equal(sx, rsx)
    assert torch.equal(qsum, rq.reshape(m, nb, 32).sum(-1).to(torch.int32))
    want = quant.q8_linear_reference(x, packed, out)
    assert torch.equal(cpu_kernel.linear(x, packed, out), want)
    assert torch.equal(cpu_kernel.linear(x[-1:].contiguous(), packed, out), want[-1:])
    # rounding x moves each product by at most |w| * max|x in its block| / 254
    amax = x.abs().reshape(m, nb, 32).amax(-1)
    bound = torch.einsum("mb,ob->mo", amax, w.abs().reshape(out, nb, 32).sum(-1)) / 254
    assert ((want - x @ w.t()).abs() <= bound * 1.01 + 1e-5).all()
    ext.set_isa_limit(1)
    try:
        assert torch.equal(cpu_kernel.linear(x, packed, out), want)
    finally:
        ext.set_isa_limit(0)


def quantized_pair(seed: int, activations: str = "float32", **kw):
    """A tiny model with Q4_1 layers and a Q8_0 lm_head (random blocks), and its float32 twin holding the dequantized
    weights: (quantized, float32)."""
    from propd.testing import tiny_model

    fp = tiny_model(seed=seed, hidden_size=64, intermediate_size=128, **kw)
    qm = tiny_model(seed=seed, hidden_size=64, intermediate_size=128, **kw)
    g = torch.Generator().manual_seed(seed + 11)
    blocks = {}
    for name, mod in fp.model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (name.startswith("model.layers.") or name == "lm_head"):
            fmt = "Q8_0" if name == "lm_head" else "Q4_1"
            O, K = mod.weight.shape
            b = random_blocks(fmt, O, K, g, scale=0.3 if fmt == "Q8_0" else 0.05)
            blocks[name] = (fmt, b)
            w = quant.dequantize_blocks(b, fmt, O, K)
            mod.weight.data.copy_(w)
            dict(qm.model.named_modules())[name].weight.data.copy_(w)
    assert quant.quantize_model(qm.model, blocks, activations=activations) == len(blocks)
    return qm, fp


@needs_kernel
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 50), lens=st.lists(st.integers(1, 24), min_size=1, max_size=5),
       preset=st.sampled_from(["ar", "bpd", "medusa", "propd", "eagle", "propd-eagle"]),
       batch=st.sampled_from([1, 2, 5]))
def test_quantized_model_decodes_as_the_float32_model(seed, lens, preset, batch):
    """Every preset on the block-quantized model gives the float32 model's `ar` tokens, every row of a batch."""
    from propd import Decoder
    from propd.models.quant import QuantLinear
    from propd.testing import random_prompts

    qm, fp = quantized_pair(seed, heads=4, early=(2,), drafter=True)
    assert isinstance(qm.model.lm_head, QuantLinear) and isinstance(qm.model.model.layers[0].mlp.up_proj, QuantLinear)
    prompts = random_prompts(fp, seed, lens)
    ar = Decoder(fp, preset="ar", entry_points=False)
    refs = [ar.generate_ids([p], max_new_tokens=16).token_ids[0] for p in prompts]
    got = Decoder(qm, preset=preset, entry_points=False).generate_ids(prompts, max_new_tokens=16,
                                                                      batch_size=batch).token_ids
    assert got == refs
    with torch.no_grad():  # and the logits themselves, bit for bit (prefill rows beyond the kernel's bound included)
        logits = [m.model.logits(m.model.hidden_states(m.model.new_cache(len(prompts), 32), prompts)[0])
                  for m in (qm, fp)]
    assert torch.equal(*logits)


@needs_kernel
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 50), lens=st.lists(st.integers(1, 24), min_size=1, max_size=4))
def test_block_lm_head_argmax_screen(seed, lens):
    """A Q8_0 ``lm_head`` whose dense float32 matrix is held (a tied embedding) gets the argmax screen where the CPU
    has AVX512-VNNI, and its screened argmax is the block kernel's, bit for bit; without the dense matrix, with 8-bit
    activations or without VNNI, no screen, and nothing is dequantized for one."""
    from propd import Decoder
    from propd.testing import random_prompts

    qm, fp = quantized_pair(seed)
    m = qm.model
    m.prepare()
    m.prepare_screen()
    assert m.__dict__["_screen"] is None and m.lm_head._dense is None  # no dense matrix held: none built for it
    m.lm_head._dense = fp.model.lm_head.weight.detach().clone()  # as a tied embedding holds it
    m.prepare_screen()
    assert (m.__dict__["_screen"] is not None) == cpu_kernel.has_vnni()
    x = torch.randn(4, m.SCREEN_ROWS // 4, 64, generator=torch.Generator().manual_seed(seed)) * 3
    if cpu_kernel.has_vnni():
        assert torch.equal(m.screened_argmax(x), m.logits(x).argmax(dim=-1))
    assert torch.equal(m.argmax(x), m.logits(x).argmax(dim=-1))
    prompts = random_prompts(fp, seed, lens)
    refs = Decoder(fp, preset="ar", entry_points=False).generate_ids(prompts, max_new_tokens=12).token_ids
    assert Decoder(qm, preset="ar", entry_points=False).generate_ids(prompts, max_new_tokens=12).token_ids == refs
    # a decoder of an argmax-only verifier builds it at its start
    m.__dict__["_screen"] = None
    dec = Decoder(qm, preset="ar", entry_points=False)
    assert (m.__dict__["_screen"] is not None) == cpu_kernel.has_vnni()
    assert dec.generate_ids(prompts, max_new_tokens=12).token_ids == refs
    q8, _ = quantized_pair(seed, activations="q8")
    q8.model.lm_head._dense = m.lm_head._dense
    q8.model.prepare_screen()
    assert q8.model.__dict__["_screen"] is None  # 8-bit activations: the output is that arithmetic's own


@needs_kernel
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 50), lens=st.lists(st.integers(1, 24), min_size=1, max_size=5),
       preset=st.sampled_from(["bpd", "medusa", "propd", "eagle", "propd-eagle"]), batch=st.sampled_from([1, 2, 5]))
def test_8bit_activations_keep_every_preset_equal_to_ar(seed, lens, preset, batch):
    """With 8-bit activations (``gguf-q8``) the output is that arithmetic's own, and every preset gives its `ar`'s
    tokens, every row of a batch: the products are row-invariant."""
    from propd.testing import assert_lossless, random_prompts

    qm, _ = quantized_pair(seed, activations="q8", heads=4, early=(2,), drafter=True)
    assert qm.model.lm_head.q8 and qm.model.model.layers[0].mlp.up_proj.q8
    assert_lossless(qm, random_prompts(qm, seed, lens), 16, batch_size=batch, preset=preset, entry_points=False)


@needs_kernel
@settings(max_examples=10, deadline=None)
@given(kind=st.sampled_from(["q8", "bfloat16"]), seed=st.integers(0, 50),
       lens=st.lists(st.integers(1, 40), min_size=2, max_size=4))
def test_a_rows_prefill_is_its_batch_one_prefill_where_steps_are_row_invariant(kind, seed, lens):
    """With 8-bit activations or in bfloat16 a last-bit difference can change tokens, so a row's prefill beside
    others (prompts of other lengths, above the kernel attention's query count) equals its prefill alone, bit for
    bit: last hidden state and every layer's keys and values."""
    from propd.testing import random_prompts, tiny_model

    if kind == "q8":
        lm, _ = quantized_pair(seed, activations="q8")
    else:
        lm = tiny_model(seed=seed, hidden_size=64, intermediate_size=128)
        lm.model.to(torch.bfloat16)
    m = lm.model
    m.prepare()
    assert m.rows_alone_in_prefill()
    prompts = random_prompts(lm, seed, lens)
    cache = m.new_cache(len(prompts), max(lens) + 4)
    last = m.prefill(cache, prompts)
    for r, p in enumerate(prompts):
        alone = m.new_cache(1, len(p) + 4)
        assert torch.equal(m.prefill(alone, [p])[0], last[r])
        for layer in range(m.num_layers):
            assert torch.equal(alone.k[layer][0, :, :len(p)], cache.k[layer][r, :, :len(p)])
            assert torch.equal(alone.v[layer][0, :, :len(p)], cache.v[layer][r, :, :len(p)])


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 20), nb=st.integers(1, 6), seed=st.integers(0, 1000), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_q8_0_quantizer_is_ggmls(rows, nb, seed, scale):
    """``quantize_q8_0`` as ggml's reference: d = max|w| / 127 per block (stored fp16), q = round(w / d) half away
    from zero; so each weight dequantizes within half a step (plus d's fp16 rounding) and a block's largest weight
    maps to +-127."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, nb * 32, generator=g) * scale
    w[0, :32] = 0.0  # an all-zero block: d = 0, q = 0
    blocks = quant.quantize_q8_0(w)
    assert blocks.dtype == torch.uint8 and blocks.shape == (rows, nb * 34)
    b = blocks.view(rows, nb, 34)
    d = b[..., :2].contiguous().view(torch.float16).float()[..., 0]
    q = b[..., 2:].contiguous().view(torch.int8).long()
    x = w.view(rows, nb, 32)
    d32 = x.abs().amax(-1) / 127
    assert torch.equal(d, d32.half().float())
    v = x * torch.where(d32 > 0, 1 / d32, torch.zeros_like(d32))[..., None]
    assert torch.equal(q, torch.sign(v).long() * torch.floor(v.abs() + 0.5).long())
    assert torch.equal(q.abs().amax(-1)[d32 > 0], torch.full_like(q.abs().amax(-1)[d32 > 0], 127))
    err = (quant.dequantize_blocks(blocks, "Q8_0", rows, nb * 32).view(rows, nb, 32) - x).abs()
    assert bool((err <= (d32 / 2 + (d - d32).abs() * 127 + 1e-12)[..., None]).all())
    with pytest.raises(PropdError, match="multiple of 32"):
        quant.quantize_q8_0(torch.zeros(2, 40))


def test_blocks_that_do_not_match_the_weights_are_refused():
    from propd.testing import tiny_model

    m = tiny_model(seed=0, hidden_size=64, intermediate_size=128)
    w = m.model.model.layers[0].mlp.up_proj.weight
    blocks = {"model.layers.0.mlp.up_proj": ("Q4_1", random_blocks("Q4_1", *w.shape, torch.Generator()))}
    with pytest.raises(PropdError, match="do not dequantize to the loaded weights"):
        quant.quantize_model(m.model, blocks)
    with pytest.raises(PropdError, match="not kept quantized"):
        quant.pack_blocks(torch.zeros(1, 18, dtype=torch.uint8), "Q4_0", 1, 32)


@needs_kernel
def test_load_a_quantized_gguf_file_as_blocks(tmp_path, monkeypatch):
    """A Q4_1 GGUF file (Q8_0 embeddings and output) loads with dtype gguf: every matrix checked against the float32
    conversion (q and k rows un-permuted as transformers does), and greedy decoding equals the float32 model's."""
    from propd import Decoder
    from propd.models.loading import load_model
    from propd.models.quant import QuantLinear
    from gguf_tiny import write_tiny_gguf

    monkeypatch.setenv("PROPD_CACHE", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "q.gguf", seed=4, quantized=True)
    qm = load_model(str(path), dtype="gguf", heads="none")
    fp = load_model(str(path), dtype="float32", heads="none")
    kinds = {type(m).__name__ for m in qm.model.modules()}
    assert "QuantLinear" in kinds and not any(isinstance(m, torch.nn.Linear) for m in qm.model.modules())
    assert qm.model.model.layers[1].self_attn.q_proj.fmt == "Q4_1" and isinstance(qm.model.lm_head, QuantLinear)
    prompts = [[5, 9, 30, 2], [7] * 11]
    want = Decoder(fp, preset="ar").generate_ids(prompts, max_new_tokens=20).token_ids
    assert Decoder(qm, preset="ar").generate_ids(prompts, max_new_tokens=20).token_ids == want
    q8 = load_model(str(path), dtype="gguf-q8", heads="none")  # llama.cpp's arithmetic: every matrix, its own output
    assert q8.weights == "gguf-q8" and all(m.q8 for m in q8.model.modules() if isinstance(m, QuantLinear))
    assert len(Decoder(q8, preset="ar").generate_ids(prompts, max_new_tokens=20).token_ids[1]) == 20


@needs_kernel
def test_dtype_auto_keeps_blocks_only_where_a_gguf_file_has_them(tmp_path, monkeypatch, tiny_dir):
    """``auto`` (the CLI's default) loads a quantized GGUF as blocks, and a float32 GGUF file or an HF directory as
    float32, without an error; ``LoadedModel.weights`` says which."""
    from propd.models.loading import load_model

    from gguf_tiny import write_tiny_gguf

    monkeypatch.setenv("PROPD_CACHE", str(tmp_path / "cache"))
    q = write_tiny_gguf(tmp_path / "q.gguf", seed=3, quantized=True)
    f = write_tiny_gguf(tmp_path / "f.gguf", seed=3)
    assert load_model(str(q), dtype="auto", heads="none").weights == "gguf"
    assert load_model(str(f), dtype="auto", heads="none").weights == "float32"
    assert load_model(str(tiny_dir), dtype="auto", heads="none").weights == "float32"
    assert load_model(str(tiny_dir), dtype="bfloat16", heads="none").weights == "bfloat16"
    with pytest.raises(PropdError, match="no Q4_1 or Q8_0"):
        load_model(str(f), dtype="gguf", heads="none")


def test_header_reader_matches_gguf_and_refuses_a_truncated_file(tmp_path):
    """propd's header-only GGUF reader finds gguf's GGUFReader's tensor table (names, shapes, types, data offsets)
    and the same blocks; a file cut inside its tensor data is refused in one line."""
    from gguf import GGUFReader

    from gguf_tiny import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "q.gguf", seed=2, quantized=True)
    infos, start = quant._gguf_tensor_infos(path)
    reader = GGUFReader(str(path))
    assert [(n, d, t, start + o) for n, d, t, o in infos] == [
        (t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), int(t.data_offset)) for t in reader.tensors]

    class Cfg:  # the two fields read_gguf_blocks uses
        num_heads, num_kv_heads = 4, 2

    blocks = quant.read_gguf_blocks(path, Cfg)
    assert blocks and {fmt for fmt, _ in blocks.values()} == {"Q4_1", "Q8_0"}
    raw = {t.name: t.data for t in reader.tensors}
    fmt, b = blocks["model.layers.0.mlp.down_proj"]
    assert np.array_equal(b.numpy().reshape(-1), np.asarray(raw["blk.0.ffn_down.weight"]).reshape(-1))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size - 100])
    with pytest.raises(PropdError, match="truncated"):
        quant.read_gguf_blocks(cut, Cfg)


def test_dtype_gguf_needs_a_gguf_source(capsys, tiny_dir):
    from propd.cli import main

    code = main(["generate", "--model", str(tiny_dir), "--dtype", "gguf", "hello"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "dtype gguf" in err and ("not a .gguf file" in err or "CPU extension" in err)


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["float32", "bfloat16", "Q4_1", "Q8_0", "Q4_1-q8", "Q8_0-q8"]), m=st.integers(1, 20),
       outs=st.lists(st.integers(1, 90), min_size=1, max_size=3), nb=st.integers(1, 4), avx2=st.booleans(),
       seed=st.integers(0, 999))
def test_products_sharing_an_input_equal_each_product_alone(kind, m, outs, nb, avx2, seed):
    """``cpu_kernel.linears`` (a layer's q, k and v in one parallel region) gives each product's own result bit for
    bit, for every weight layout and on both ISA paths; weights packed differently are refused."""
    ext = cpu_kernel.extension()
    g = torch.Generator().manual_seed(seed)
    K = 32 * nb
    ext.set_isa_limit(int(avx2))  # bf16's packing follows the path (pairs on AVX512-BF16)
    try:
        if kind in ("float32", "bfloat16"):
            dtype = getattr(torch, kind)
            packed = [cpu_kernel.pack(torch.randn(o, K, generator=g).to(dtype)) for o in outs]
        else:
            fmt, _, acts = kind.partition("-")
            dtype = torch.float32
            packed = [quant.pack_blocks(random_blocks(fmt, o, K, g), fmt, o, K, activations=acts or "float32")
                      for o in outs]
        x = torch.randn(m, K, generator=g).to(dtype)
        ys = cpu_kernel.linears(x, packed, outs)
        assert len(ys) == len(outs)
        for y, p, o in zip(ys, packed, outs):
            assert y.shape == (m, o) and y.dtype == dtype
            assert torch.equal(y, cpu_kernel.linear(x, p, o))
    finally:
        ext.set_isa_limit(0)
    other = cpu_kernel.pack(torch.randn(16, K, generator=g).to(torch.bfloat16 if dtype == torch.float32 else torch.float32))
    with pytest.raises(RuntimeError, match="packed alike"):
        cpu_kernel.linears(x, [packed[0], other], [outs[0], 16])
