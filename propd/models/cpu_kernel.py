"""propd's CPU extension for decoding steps (float32 and bfloat16, x86-64 with AVX2 and FMA; AVX-512F where present).

* :func:`linear`: ``x @ W^T`` for 1-128 rows of ``x`` in float32 (1-1024 on AVX-512), any number in bf16 (below);
* :func:`attention`: softmax attention of up to 16 query tokens per row over the KV cache, each query row computed on
  its own (the same bits whatever the tree size or batch), or where that is not asked (float32) from 4 tokens on
  AVX-512 on :func:`causal_attention`'s tiles;
* :func:`causal_attention`: a prefill chunk's causal self-attention (flash attention, float32);
* :func:`rope_and_cache` and :func:`rms_norm`: a layer's rotary embedding plus cache write, and RMSNorm, each in one
  call instead of about twenty and eight small torch ops;
* GGUF blocks (``propd.models.quant``, ``--dtype gguf``): :func:`linear` also takes Q4_1 and Q8_0 weights packed by
  ``quant.pack_blocks``, dequantized in registers and summed in the float32 path's order (the float32 bits at about
  a fifth of the bytes), and :func:`dequantize` gives their dense float32 matrix for calls of more rows; with
  ``--dtype gguf-q8`` the same blocks take 8-bit activations and exact integer dot products (AVX512-VNNI where the
  CPU has it, :func:`has_vnni`; else AVX2), llama.cpp's arithmetic, row-invariant at any row count;
* :func:`decoder_layer`: all of the above for one decoder layer of a step in one call (``DecoderLayer.forward``
  uses it when every part would go to the extension anyway); on the default model this cut a 1-16 token step's 30
  layers to about two thirds of their time with torch's element-wise ops and SDPA (``python
  benchmarks/fused_layer.py``; docs/architecture.md, "Model core"); the extension's ``LayerStack`` runs a step's
  layers in one call (``cpu_modules.run_layers_fused``).

The linear kernel: a decoding step multiplies every weight matrix by only a handful of rows (one per tree node and row of the batch),
where MKL's general matrix product runs far below the machine's memory bandwidth. ``csrc/packed_linear.cpp`` packs
each weight once into panels of 16 output rows and computes the product with an AVX2/FMA register-blocked
micro-kernel (BLIS-style: Van Zee and van de Geijn, ACM TOMS 2015), streaming each weight from memory once per call;
with more than 6 rows, the row blocks after the first read the panel from cache while prefetching the next one. Where
the CPU has AVX-512F (CPUID at run time) an AVX-512 micro-kernel in the same build takes the panels 16 wide, with the
same result bit for bit (:func:`isa`). It is faster than MKL and oneDNN at every row count from 1 to 64
(``python benchmarks/linear_kernel.py``, ``benchmarks/isa_paths.py``; docs/architecture.md, "Model core"). bfloat16 weights are streamed as
they are and widened to float32 in registers (sums in float32, one rounding at the end); on CPUs without bf16
arithmetic torch's own bf16 products were 6x slower at every row count tried (1-1024), so bf16 always goes here.
Every output row is computed in the same order whatever the other rows are (batch invariance).

The extension is compiled with ``torch.utils.cpp_extension`` the first time it is needed (about a minute, once per
version of the source; cached under ``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``; a build killed
midway is redone by the next run, :func:`load_or_build`). It needs an x86-64
CPU with AVX2 and FMA, a C++ compiler and ninja (the ``ninja`` package, a dependency, provides it); where any is
missing, or ``PROPD_CPU_KERNEL=0`` is set, :func:`extension` returns None and torch serves instead (MKL products,
SDPA, element-wise ops), with one line on stderr saying why (except when turned off). The packed copy costs as much memory as the weights it packs, at most
``PROPD_CPU_KERNEL_MAX_GB`` (default 4) GiB in all; matrices beyond that use MKL.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import weakref
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "packed_linear.cpp"
DTYPES = (torch.float32, torch.bfloat16)  # weight types the kernel packs
# no contraction of a * b + c into an FMA where the source does not ask for one: rope_and_cache must round as torch does
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"]
# The most rows of a float32 product (and of one on GGUF blocks) the kernel takes, by the ISA it runs on; above, MKL
# (on the blocks dequantized for the call) was as fast. Measured on the default model's matrices, streamed, in decoding
# steps and prefills (benchmarks/linear_kernel.py, benchmarks/row_bound.py): up to 128 rows on AVX2 (prefills of
# 192-256 rows gained nothing or lost), up to 1024 on AVX-512 (steps and prefills of 129-512 rows gained, 1024 level).
# One bound for both kinds, so that GGUF blocks give the float32 model's bits at every row count.
ROW_BOUNDS = {"avx2": 128, "avx512": 1024}
MAX_ROWS: int | None = None  # an int: this bound on every ISA (benchmarks that compare bounds)
# bfloat16: torch's products on CPUs without bf16 arithmetic were 6x slower than the kernel at 64, 256 and 1024 rows
# alike (benchmarks/linear_kernel.py bfloat16), so the kernel serves every row count, prefill included
MAX_ROWS_BF16 = 1 << 62


def max_rows(dtype: torch.dtype) -> int:
    """The most rows of ``x`` that ``Linear`` sends to the kernel for weights of ``dtype``, on the ISA the loaded
    extension runs (``ROW_BOUNDS``; AVX2's before it is loaded)."""
    if dtype == torch.bfloat16:
        return MAX_ROWS_BF16
    return _state["bounds"] if MAX_ROWS is None else MAX_ROWS


_state: dict = {"ext": None, "tried": False, "packed_bytes": 0, "bounds": ROW_BOUNDS["avx2"]}


def _note(msg: str) -> None:
    print(f"propd: {msg}", file=sys.stderr, flush=True)


def supported() -> bool:
    """Whether this CPU can run the kernel: x86-64 with AVX2 (torch's AVX2 level includes FMA)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    except AttributeError:  # torch < 2.2
        return False


def enabled() -> bool:
    """Whether the kernel may be used: the CPU supports it and ``PROPD_CPU_KERNEL`` is not 0."""
    return os.environ.get("PROPD_CPU_KERNEL", "1").strip() not in ("0", "false", "no", "off") and supported()


def loaded():
    """The extension if it is loaded already (None otherwise): for callers that use it only where it is there anyway."""
    return _state["ext"] if _state["tried"] else None


def extension():
    """The compiled extension module, or None where it cannot be used (see the module docstring)."""
    if _state["tried"]:
        return _state["ext"]
    _state["tried"] = True
    if not enabled():
        return None
    try:
        from torch.utils import cpp_extension

        if shutil.which("ninja") is None:  # torch's builder runs `ninja`; the ninja package ships one
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")

        # one build per version of the source, so that a changed kernel is announced and rebuilt, never stale
        name = "propd_packed_linear_" + hashlib.sha1(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:12]
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))

        def build():
            _note("compiling the CPU extension once (about a minute; PROPD_CPU_KERNEL=0 skips it)")
            return cpp_extension.load(name, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                                      verbose=False)

        _state["ext"] = load_or_build(build_dir, name, build)
        limit = {"avx2": 1, "avx512": 2}.get(os.environ.get("PROPD_CPU_ISA", "").strip().lower(), 0)
        _state["ext"].set_isa_limit(limit)
        _state["bounds"] = ROW_BOUNDS["avx512" if _state["ext"].isa().startswith("avx512") else "avx2"]
        if _state["ext"].isa().startswith("avx512"):
            _state["ext"].set_attention_wide(_attention_wide_pays(_state["ext"]))
    except Exception as exc:  # no compiler, no ninja, a failed build: MKL serves instead
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        _note(f"CPU extension unavailable, using torch's kernels ({type(exc).__name__}: {first[:200]})")
        _state["ext"] = None
    return _state["ext"]


def _attention_wide_pays(ext) -> bool:
    """Whether the decoding attention kernel's AVX-512 path beats its AVX2 path on this CPU (the same bits either
    way): timed once, taking turns, on a 4-token step of the default model's shapes over 512 keys (a few ms). CPUs
    that split 512-bit operations in two (AMD Zen 4) run the 8-lane path faster (docs/architecture.md)."""
    import time

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, 64, generator=g) for h, n in ((9, 4), (3, 516), (3, 516)))
    mask = torch.ones(1, 4, 516, dtype=torch.bool)
    best = {}
    try:
        for _ in range(3):
            for wide in (True, False):
                ext.set_attention_wide(wide)
                t = time.perf_counter()
                for _ in range(10):
                    ext.tree_attention(q, k, v, mask, 0.125)
                best[wide] = min(best.get(wide, float("inf")), time.perf_counter() - t)
    finally:
        ext.set_attention_wide(True)
    return best[True] <= best[False]


def load_or_build(build_dir: Path, name: str, build):
    """The extension module ``name`` from ``build_dir/name.so``, or ``build()``'s (which compiles it there) where
    that file is missing or cannot be loaded (a killed link's partial file).

    A built module is imported directly, without torch's builder: that builder takes a lock file ("baton") in the
    build directory even to find the build up to date, and a process killed while holding it leaves the file, on
    which every later ``cpp_extension.load`` waits forever. Builds run under an OS file lock (released when its
    process dies) that serialises propd processes, so a baton found while holding it is a killed build's and is
    removed."""
    from propd.files import locked

    so = build_dir / f"{name}.so"
    if so.is_file():
        try:
            return _import_so(name, so)
        except ImportError:
            pass
    with locked(build_dir.parent / f".{name}.lock", "the CPU extension"):
        if so.is_file():  # another process may have built it while this one waited
            try:
                return _import_so(name, so)
            except ImportError:
                so.unlink()
        (build_dir / "lock").unlink(missing_ok=True)
        return build()


def _import_so(name: str, so: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def isa() -> str | None:
    """The instruction set the linear kernel runs with: ``avx512bf16-amx`` where the CPU also has AMX-BF16 (bf16
    products on AMX tiles), ``avx512bf16`` where it has AVX-512F and AVX512-BF16 (bf16 weights packed in pairs for
    ``vdpbf16ps``), ``avx512`` with AVX-512F alone, else ``avx2`` (read at run time); None without the extension.
    ``PROPD_CPU_ISA=avx2`` keeps it on AVX2, ``PROPD_CPU_ISA=avx512`` off AMX."""
    ext = extension()
    return None if ext is None else ext.isa()


def _limit_bytes() -> int:
    try:
        return int(float(os.environ.get("PROPD_CPU_KERNEL_MAX_GB", "4")) * 2**30)
    except ValueError:
        return 4 * 2**30


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` (O, K) packed for :func:`linear`, or None if the kernel is unavailable or the memory cap is
    reached. The caller caches it; its bytes count against the cap until it is freed."""
    ext = extension()
    if ext is None:
        return None
    size = (weight.numel() + 16 * weight.shape[1]) * weight.element_size()
    if _state["packed_bytes"] + size > _limit_bytes():
        return None
    with torch.no_grad():
        packed = ext.pack(weight.detach().contiguous())
    _state["packed_bytes"] += size
    weakref.finalize(packed, _release, size)
    return packed


def _release(size: int) -> None:
    _state["packed_bytes"] -= size


# attention: steps of at most this many query tokens per row (AR steps and trees of up to 16 nodes) go to the kernel;
# bigger trees and prefill go to SDPA, whose matrix-product blocking wins from about 16-32 queries
# (`python benchmarks/attention.py`; figures in docs/lab)
ATTENTION_MAX_QUERIES = 16
# decoding steps in bfloat16 and float16 go to the kernel up to this many queries whatever the speed: its results do
# not depend on the number of queries, so a token's logits do not depend on the tree size, and every preset gives
# `ar`'s tokens in bf16 too (SDPA's blocking changes the sums' order with the query count)
EXACT_MAX_QUERIES = 256


def rounds_to_tokens(dtype: torch.dtype, q8: bool = False) -> bool:
    """Whether a model in ``dtype`` (``q8``: its products take 8-bit activations) turns a last-bit difference into
    other tokens often enough that its decoding steps must be row-invariant (bfloat16/float16, 8-bit activations)."""
    return q8 or dtype in (torch.bfloat16, torch.float16)


def attention_limit(dtype: torch.dtype, decoding: bool, exact: bool = False) -> int:
    """The most queries per row :func:`attention` takes for a call in ``dtype`` (``decoding``: a decoding step, not a
    prefill; ``exact``: the model's products take 8-bit activations). Where :func:`rounds_to_tokens`, every decoding
    step takes the kernel, whose rows are invariant to the others."""
    return EXACT_MAX_QUERIES if decoding and rounds_to_tokens(dtype, exact) else ATTENTION_MAX_QUERIES


def serves(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """What every op of the extension needs: ``x`` a CPU tensor of a type it takes, ``others`` of the same type, no
    gradient wanted through any of them (the extension has no backward), and the extension built."""
    return (x.device.type == "cpu" and x.dtype in DTYPES and all(t.dtype == x.dtype for t in others)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others)))
            and extension() is not None)


def attention_fits(q: torch.Tensor, keys: torch.Tensor, decoding: bool = True, exact: bool = False) -> bool:
    """Whether :func:`attention` serves these (B, Hq, T, D) queries and (B, Hk, S, D) keys (``exact``: as for
    :func:`attention_limit`)."""
    return (q.shape[2] <= attention_limit(q.dtype, decoding, exact) and q.shape[-1] % 8 == 0
            and q.shape[1] % keys.shape[1] == 0 and keys.stride(-1) == 1 and serves(q, keys))


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
              scale: float, invariant: bool = True) -> torch.Tensor:
    """Softmax attention of few queries over cached keys: q (B, Hq, T, D), keys and values (B, Hk, S, D) (views of the
    cache, Hq a multiple of Hk), mask (B, T, S) bool, true where a query may attend. Returns (B, T, Hq * D).

    Each query row is computed on its own, by the same sequence of operations whatever T, S (masked keys add exact
    zeros or are skipped) or the batch, so a token's attention in a small tree step equals its attention in an AR step
    bit for bit. The rows that share a key head are taken in blocks that walk the keys in tiles of 64, so a tile is
    read from memory once per block. Scores and sums are float32 (bfloat16 inputs are widened, the output rounded
    once); the softmax's exp is a polynomial within about 2 ulp of ``expf``. ``python benchmarks/attention.py``
    compares it with ``F.scaled_dot_product_attention``.

    Without ``invariant`` (float32 steps, where a last-bit difference does not change tokens: :func:`rounds_to_tokens`),
    a step of at least 4 query tokens per row on an AVX-512 CPU (head size 64 or 128) runs on the tiles of
    :func:`causal_attention` instead, over its keys transposed for the call (``python benchmarks/attention.py``
    compares them; docs/architecture.md): a token's last bits then depend on whether its step had 4 tokens or more."""
    return _state["ext"].step_attention(q, keys, values, mask, scale, invariant)


def causal_fits(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether :func:`causal_attention` serves these (B, Hq, T, D) queries and (B, Hk, S, D) keys: float32 or
    bfloat16, D of 64 or 128, Hq a multiple of Hk, unit stride in D."""
    return (q.dtype in DTYPES and q.shape[-1] in (64, 128) and q.shape[1] % keys.shape[1] == 0
            and q.stride(-1) == 1 and keys.stride(-1) == 1 and serves(q, keys))


def causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal self-attention of a prefill chunk: q (B, Hq, T, D) at positions S - T .. S - 1 of every row, keys and
    values (B, Hk, S, D) (views of the cache), each query seeing keys up to its own position. Returns (B, T, Hq * D).

    Flash attention (Dao et al. 2022; online softmax, Milakov and Gimelshein 2018) on keys transposed into blocks of
    16 (8 on AVX2), so that scores run as a product's micro-kernel: about 1.4-3x ``F.scaled_dot_product_attention``'s
    speed at 300-2,000 tokens (``python benchmarks/attention.py causal``). Rows are independent of each other.
    bfloat16 inputs are widened to float32 and the result rounded once (the widening is a small part of the call)."""
    if q.dtype == torch.bfloat16:
        return _state["ext"].causal_attention(q.float(), keys.float(), values.float(), scale).bfloat16()
    return _state["ext"].causal_attention(q, keys, values, scale)


def rope_fits(q: torch.Tensor, cache_k: torch.Tensor) -> bool:
    """Whether :func:`rope_and_cache` serves these projections and this cache layer."""
    return cache_k.stride(-1) == 1 and serves(q, cache_k)


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   cache_k: torch.Tensor, cache_v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of the new tokens' queries and keys, and the cache write of their keys and values, in one call
    (in place of about twenty small torch ops per layer). q (B, T, Hq * D), k and v (B, T, Hk * D); cos and sin
    (B, T, D); ``cache_k``/``cache_v`` one layer's (B, Hk, capacity, D); pos (B, T). Returns the rotated queries
    (B, Hq, T, D). Equal bit for bit to ``x * cos + rotate_half(x) * sin`` and a scatter."""
    return _state["ext"].rope_and_cache(q.contiguous(), k.contiguous(), v.contiguous(), cos.contiguous(),
                                        sin.contiguous(), cache_k, cache_v, pos.contiguous())


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for float32 or bfloat16 CPU values (the first index among equal maxima; a row's first NaN
    where it has one), by the extension where it serves, else by torch. A greedy step reads each node's argmax over
    the vocabulary: the extension's pass runs at about the memory's pace, torch's argmax several times slower."""
    if x.dim() == 0 or x.shape[-1] == 0 or not serves(x) or not x.is_contiguous():
        return x.argmax(dim=-1)
    return _state["ext"].row_argmax(x.reshape(-1, x.shape[-1])).view(x.shape[:-1])


def screen_survivors(approx: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor, err: torch.Tensor,
                     norm: torch.Tensor) -> torch.Tensor:
    """The ids (ascending) that some row of ``approx`` (N, V) cannot rule out under the bounds
    c = l1 (N,) x err (V,) + l2 (N,) x norm (V,): ``((approx + c) >= (approx - c).amax(1, keepdim=True)).any(0)``'s
    nonzero entries, with the same float32 operations, in two passes (:mod:`propd.models.screen`)."""
    return _state["ext"].screen_survivors(approx, l1, l2, err, norm)


def tree_mask(lengths: torch.Tensor, S: int, node_idx: torch.Tensor, tree_mask: torch.Tensor,
              depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tree step's (B, 1, Tq, S) attention mask, query positions (B, Tq) and cache write positions (B, Tq), as
    :func:`propd.models.llama.tree_attention_inputs` defines them, in one call (CPU tensors)."""
    return _state["ext"].tree_mask(lengths, S, node_idx, tree_mask, depths)


def screen_tables(weight: torch.Tensor, rounding: float) -> tuple[torch.Tensor, ...]:
    """The argmax screen's tables of a contiguous float32 or bfloat16 (V, K) ``weight``
    (:func:`propd.models.screen.reference_tables` defines them): Q8_0 blocks (V, K / 32 * 34) uint8, coef
    (V, 2 K / 32), and each row's largest coefficients (V,)."""
    return _state["ext"].screen_tables(weight, rounding)


def screen_argmax(x: torch.Tensor, approx: torch.Tensor, err: torch.Tensor, norm: torch.Tensor, coef: torch.Tensor,
                  weight: torch.Tensor, max_candidates: int) -> tuple[torch.Tensor, ...]:
    """The argmax screen (:mod:`propd.models.screen`) after its 8-bit product ``approx`` (N, V) of rows ``x`` (N, K),
    in one call: (argmax (N,), settled (N,) bool, candidate ids (C,), each row's candidates (N, C), finite (N,)).
    The settled rows' argmax is the full float32 product's, bit for bit; the others' is left for the caller."""
    return _state["ext"].screen_argmax(x, approx, err, norm, coef, weight, max_candidates)


def rms_norm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`rms_norm` serves this input and weight."""
    return x.shape[-1] % 8 == 0 and serves(x, weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension in one call (in place of about eight small torch ops): float32 arithmetic, the
    normalized row rounded to x's type, then scaled by ``weight``, as ``propd.models.llama.RMSNorm`` computes it; the
    sum of squares runs in a fixed order per row, so a row's result does not depend on the others (it may differ from
    torch's reduction in the last bit, so it serves every call alike: prefill, every step and every method)."""
    return _state["ext"].rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), eps).view(x.shape)


def decoder_layer(x: torch.Tensor, weights: list[torch.Tensor], outs: list[int], cos: torch.Tensor, sin: torch.Tensor,
                  cache_k: torch.Tensor, cache_v: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, eps: float,
                  scale: float, invariant: bool = True) -> torch.Tensor:
    """A whole Llama decoder layer of a decoding step in one call: :func:`rms_norm`, the q/k/v products,
    :func:`rope_and_cache`, :func:`attention`, the output product and residual, :func:`rms_norm`, gate and up,
    ``silu(gate) * up`` (torch's ops), down and residual, in ``DecoderLayer.forward``'s order and with its functions,
    so the result is the same bit for bit; what goes is the Python between the parts (see
    ``DecoderLayer._fused_weights`` for when it is used)."""
    return _state["ext"].decoder_layer(x, weights, outs, cos.contiguous(), sin.contiguous(), cache_k, cache_v,
                                       pos.contiguous(), mask.contiguous(), eps, scale, invariant)


def pack_blocks(blocks: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """``propd.models.quant.pack_blocks`` in the extension (the same bytes): ggml blocks (O, row bytes) uint8 of
    Q4_1 (20-byte) or Q8_0 (34-byte) blocks -> panels (ceil(O / 16), K / 32, panel bytes)."""
    return _state["ext"].pack_gguf_blocks(blocks.contiguous(), block_bytes)


def pack_gguf_for_q8(blocks: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """``propd.models.quant.pack_blocks(..., activations="q8")`` in the extension: ggml Q4_1 (20-byte) or Q8_0
    (34-byte) blocks (O, row bytes) uint8 -> int8 panels (ceil(O / 16), K / 32, 320 or 544) for the kernel with
    8-bit activations."""
    return _state["ext"].pack_gguf_for_q8(blocks.contiguous(), block_bytes)


def quantize_rows_q8(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A contiguous (M, K) float32 ``x2`` rounded as the 8-bit-activation kernel rounds it: (xq int8 (M, K),
    dx (M, K / 32), sx (M, K / 32), qsum int32 (M, K / 32)); for tests."""
    return _state["ext"].quantize_rows_q8(x2.contiguous())


def has_vnni() -> bool:
    """Whether the 8-bit-activation kernel runs on AVX512-VNNI (read at run time; else its AVX2 form)."""
    ext = extension()
    return ext is not None and ext.has_vnni()


def dequantize(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The (out_features, K) float32 matrix of GGUF blocks packed by ``propd.models.quant.pack_blocks`` (either
    layout), rounded as gguf's ``dequantize`` (the extension must be loaded)."""
    return _state["ext"].dequantize_packed(packed, out_features)


def linear(x2: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x2 @ W^T`` for a contiguous (rows, K) ``x2`` of ``W``'s dtype (float32 or bfloat16) and ``packed = pack(W)``.
    bfloat16 is computed in float32 and rounded once at the end."""
    return _state["ext"].packed_linear(x2, packed, out_features)


def linears(x2: torch.Tensor, packed: list[torch.Tensor], out_features: list[int]) -> list[torch.Tensor]:
    """:func:`linear` of one ``x2`` by several weights packed alike (one dtype and layout), in one parallel region (a
    decoder layer's q, k and v; gate and up): each result equals :func:`linear`'s alone, bit for bit."""
    return _state["ext"].packed_linears(x2, list(packed), list(out_features))
