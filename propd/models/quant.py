"""Weights kept in their GGUF block format (``--dtype gguf``): Q4_1 and Q8_0 matrices stay quantized in memory and are
dequantized in registers by the CPU extension (``csrc/packed_linear.cpp``, "GGUF blocks").

ggml's formats (llama.cpp ``ggml-common.h``) hold 32 consecutive weights of a row per block with a float16 scale:

* Q4_1 (20 bytes): ``d``, ``m`` (fp16), 16 bytes of 4-bit ``q``; weight ``j`` is the low nibble of byte ``j`` and
  weight ``j + 16`` its high nibble; ``w = d * q + m``.
* Q8_0 (34 bytes): ``d`` (fp16), 32 int8 ``q``; ``w = q * d``.

The kernel rounds every weight as gguf's reference ``dequantize`` does (float32 ``d * q``, then ``+ m``) and sums in
the float32 path's order, so a model with these layers decodes bit for bit as the float32 model on the dequantized
weights (the weights ``propd`` converts a GGUF file to), at about a fifth of the bytes streamed per step (Q4_1: 0.625
bytes per weight against 4). Activations stay float32: unlike llama.cpp, which quantizes them to 8 bits for its dot
products, nothing about the output changes. :func:`quantize_model` checks that equality on every matrix it replaces.

``--dtype gguf-q8`` takes llama.cpp's arithmetic instead (``activations="q8"``): each row of the input is rounded to
int8 per block of 32 (ggml's Q8_1: :func:`quantize_activations`) and each block's dot product with the 4- or 8-bit
quants is an exact integer (AVX512-VNNI ``vpdpbusd`` where the CPU has it, else AVX2), scaled and summed in a fixed
order (:func:`q8_linear_reference`). One ``vpdpbusd`` does 64 byte products where an FMA does 16 float32 ones, which
matters most where a step is bound by arithmetic (tree steps, prefill). The output is this arithmetic's own (not
float32's), and every preset still gives its ``ar``'s tokens, since each row's result depends on that row alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from propd.errors import PropdError

QK = 32  # weights per block
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}  # ggml's block sizes
PANEL_BYTES = {"Q4_1": 320, "Q8_0": 544}  # one packed panel block: 16 outputs x 32 weights (csrc, "GGUF blocks")
PANEL = 16
ACTIVATIONS = ("float32", "q8")  # float32: the float32 model's bits; q8: llama.cpp's 8-bit activations
# panel blocks for 8-bit activations (csrc, "GGUF blocks, 8-bit activations")
Q8_PANEL_BYTES = {"Q4_1": 320, "Q8_0": 544}


def _fp16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2n) uint8 -> (..., n) float32: little-endian fp16 values, widened exactly."""
    return b.contiguous().view(torch.float16).float()


def dequantize_blocks(blocks: torch.Tensor, fmt: str, out_features: int, in_features: int) -> torch.Tensor:
    """ggml blocks (O, K / 32 * block bytes) uint8 -> the (O, K) float32 matrix, rounded as gguf's ``dequantize``."""
    b = blocks.reshape(out_features, in_features // QK, BLOCK_BYTES[fmt])
    d = _fp16(b[..., 0:2])
    if fmt == "Q4_1":
        m = _fp16(b[..., 2:4])
        qs = b[..., 4:]
        q = torch.cat([qs & 15, qs >> 4], dim=-1).float()  # weights j and j + 16
        w = d * q + m  # two roundings, as numpy's (d * qs) + m
    else:
        w = b[..., 2:].contiguous().view(torch.int8).float() * d
    return w.reshape(out_features, in_features)


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """A float (O, K) matrix, K a multiple of 32 -> ggml Q8_0 blocks (O, K / 32 * 34) uint8, as ggml's
    ``quantize_row_q8_0_ref``: per block of 32, d = max|w| / 127 (stored fp16), q = round(w / d) (half away from
    zero). For weights propd quantizes itself (a drafter's): lossy, and used only where the output cannot change."""
    O, K = w.shape
    if K % QK:
        raise PropdError(f"Q8_0 needs rows of a multiple of {QK} weights, got {K}")
    x = w.detach().float().reshape(O, K // QK, QK)
    d = x.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    v = x * inv
    q = (v.sign() * (v.abs() + 0.5).floor()).clamp(-127, 127).to(torch.int8)  # roundf: half away from zero
    d16 = d.to(torch.float16).view(torch.uint8).reshape(O, K // QK, 2)
    return torch.cat([d16, q.view(torch.uint8)], dim=-1).reshape(O, K // QK * BLOCK_BYTES["Q8_0"]).contiguous()


def pack_blocks(blocks: torch.Tensor, fmt: str, out_features: int, in_features: int,
                activations: str = "float32") -> torch.Tensor:
    """ggml blocks (O, K / 32 * block bytes) -> the extension's panels (ceil(O / 16), K / 32, panel bytes), outputs
    padded with zero blocks (weight 0). ``activations="q8"``: the int8-marked panels of the kernel with 8-bit
    activations (:func:`pack_for_q8`)."""
    if fmt not in BLOCK_BYTES:
        raise PropdError(f"GGUF block type {fmt} is not kept quantized (propd keeps {', '.join(BLOCK_BYTES)})")
    if in_features % QK:
        raise PropdError(f"a {fmt} matrix needs rows of a multiple of {QK} weights, got {in_features}")
    from propd.models import cpu_kernel

    if activations == "q8":
        if cpu_kernel.extension() is not None and blocks.device.type == "cpu":
            bb = BLOCK_BYTES[fmt]
            return cpu_kernel.pack_gguf_for_q8(blocks.reshape(out_features, in_features // QK * bb), bb)
        return pack_for_q8(blocks, fmt, out_features, in_features)
    if cpu_kernel.extension() is not None and blocks.device.type == "cpu":
        nb, bb = in_features // QK, BLOCK_BYTES[fmt]
        return cpu_kernel.pack_blocks(blocks.reshape(out_features, nb * bb), bb)
    return pack_blocks_reference(blocks, fmt, out_features, in_features)


def _panel_blocks(blocks: torch.Tensor, fmt: str, out_features: int, in_features: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml blocks (O, K / 32 * block bytes) -> (each panel block's 16 outputs' blocks (P, nb, 16, block bytes),
    outputs padded with zero blocks; their fp16 ``d`` bytes side by side (P, nb, 32))."""
    nb, bb = in_features // QK, BLOCK_BYTES[fmt]
    b = blocks.reshape(out_features, nb, bb)
    P = -(-out_features // PANEL)
    if P * PANEL != out_features:
        b = torch.cat([b, b.new_zeros(P * PANEL - out_features, nb, bb)])
    b = b.view(P, PANEL, nb, bb).permute(0, 2, 1, 3)  # (P, nb, 16 outputs, block)
    return b, b[..., 0:2].reshape(P, nb, 2 * PANEL)


def pack_blocks_reference(blocks: torch.Tensor, fmt: str, out_features: int, in_features: int) -> torch.Tensor:
    """:func:`pack_blocks` in torch ops (where the extension is unavailable, and to test it)."""
    b, d = _panel_blocks(blocks, fmt, out_features, in_features)
    P, nb = b.shape[0], b.shape[1]
    if fmt == "Q4_1":
        m = b[..., 2:4].reshape(P, nb, 2 * PANEL)
        qs = b[..., 4:]
        q = torch.cat([qs & 15, qs >> 4], dim=-1)  # (P, nb, 16, 32): q[k] in 0..15
        pairs = q[..., 0::2] | (q[..., 1::2] << 4)  # (P, nb, 16 outputs, 16 pairs): k = 2j low, 2j + 1 high
        body = pairs.transpose(2, 3).reshape(P, nb, PANEL * QK // 2)
        return torch.cat([d, m, body], dim=-1).contiguous()
    body = b[..., 2:].transpose(2, 3).reshape(P, nb, PANEL * QK)  # (P, nb, 32 k x 16 outputs)
    return torch.cat([d, body], dim=-1).contiguous()


def pack_for_q8(blocks: torch.Tensor, fmt: str, out_features: int, in_features: int) -> torch.Tensor:
    """ggml blocks (O, K / 32 * block bytes) -> int8 panels (ceil(O / 16), K / 32, 320 or 544) for 8-bit activations,
    in torch ops: fp16 scales (Q4_1: d[16], m[16]; Q8_0: d[16]), then groups g of 4 k, 16 outputs x 4 bytes: Q4_1
    ggml's qs bytes 4g .. 4g + 3 (low nibbles k = 4g + i, high nibbles k = 16 + 4g + i), Q8_0 q[4g + i] + 128."""
    b, d = _panel_blocks(blocks, fmt, out_features, in_features)
    P, nb = b.shape[0], b.shape[1]
    if fmt == "Q4_1":
        m = b[..., 2:4].reshape(P, nb, 2 * PANEL)
        body = b[..., 4:].reshape(P, nb, PANEL, 4, 4).transpose(2, 3).reshape(P, nb, 4 * PANEL * 4)  # (g, o, i)
        return torch.cat([d, m, body], dim=-1).contiguous().view(torch.int8)
    q = b[..., 2:] ^ 0x80  # q + 128 as unsigned bytes
    body = q.reshape(P, nb, PANEL, 8, 4).transpose(2, 3).reshape(P, nb, 8 * PANEL * 4)
    return torch.cat([d, body], dim=-1).contiguous().view(torch.int8)


def _q8_panel_quants(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Int8-marked panels (P, nb, bytes) -> (q (P, nb, 16, 32) int64 as ggml holds them, d (P, nb, 16), m or None)."""
    P, nb = packed.shape[0], packed.shape[1]
    u = packed.view(torch.uint8)
    d = _fp16(u[..., 0:32])
    if packed.shape[2] == Q8_PANEL_BYTES["Q4_1"]:
        m = _fp16(u[..., 32:64])
        qs = u[..., 64:].reshape(P, nb, 4, PANEL, 4).transpose(2, 3).reshape(P, nb, PANEL, 16)  # ggml's qs bytes
        return torch.cat([qs & 15, qs >> 4], dim=-1).to(torch.int64), d, m
    q = u[..., 32:].reshape(P, nb, 8, PANEL, 4).transpose(2, 3).reshape(P, nb, PANEL, QK)
    return q.to(torch.int64) - 128, d, None


def dequantize_packed(packed: torch.Tensor, fmt: str, out_features: int, in_features: int) -> torch.Tensor:
    """The (O, K) float32 matrix of :func:`pack_blocks`' panels (either layout), rounded as gguf's ``dequantize``."""
    P, nb = packed.shape[0], packed.shape[1]
    if packed.dtype == torch.int8:  # panels for 8-bit activations
        q, d, m = _q8_panel_quants(packed)
        w = d[..., None] * q.float()  # Q8_0: q * d; Q4_1: d * q + m
        if m is not None:
            w = w + m[..., None]
        return w.permute(0, 2, 1, 3).reshape(P * PANEL, nb * QK)[:out_features]
    d = _fp16(packed[..., 0:32])[:, :, None, :]  # (P, nb, 1, 16)
    if fmt == "Q4_1":
        m = _fp16(packed[..., 32:64])[:, :, None, :]
        pairs = packed[..., 64:].reshape(P, nb, QK // 2, PANEL)
        q = torch.stack([pairs & 15, pairs >> 4], dim=3).reshape(P, nb, QK, PANEL).float()
        w = d * q + m
    else:
        q = packed[..., 32:].contiguous().view(torch.int8).reshape(P, nb, QK, PANEL).float()
        w = q * d
    return w.permute(0, 3, 1, 2).reshape(P * PANEL, nb * QK)[:out_features]


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, K) float32 -> (xq (M, K) float32 holding int8 values, dx (M, K / 32), sx (M, K / 32)): each block of 32
    rounded as the 8-bit-activation kernel rounds it (ggml's Q8_1: dx = max|x| / 127, xq = round-half-even(x * (1 /
    dx)), sx = dx * sum(xq)), in torch ops."""
    M, K = x.shape
    xb = x.reshape(M, K // QK, QK)
    d = xb.abs().amax(dim=-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    xq = torch.round(xb * inv[..., None]).clamp(-127, 127)
    return xq.reshape(M, K), d, d * xq.sum(dim=-1)


def q8_linear_reference(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x`` (M, K) float32 times int8-marked panels, with the kernel's arithmetic in torch ops (where the extension
    is unavailable, and to test it): per block b in order, ``acc = acc + (d * dx) * isum``, then for Q4_1
    ``acc = acc + m * sx``; isum the exact integer dot product of the weights' quants and the 8-bit activations."""
    P, nb = packed.shape[0], packed.shape[1]
    q, d, m = _q8_panel_quants(packed)  # (P, nb, 16, 32)
    xq, dx, sx = quantize_activations(x.float())
    xi = xq.to(torch.int64).reshape(x.shape[0], nb, QK)
    isum = torch.einsum("mbk,pbok->mbpo", xi, q).float()  # exact: integers, summed in int64
    acc = torch.zeros(x.shape[0], P, PANEL)
    for b in range(nb):
        acc = acc + (d[:, b][None] * dx[:, b, None, None]) * isum[:, b]
        if m is not None:
            acc = acc + m[:, b][None] * sx[:, b, None, None]
    return acc.reshape(x.shape[0], P * PANEL)[:, :out_features]


class QuantLinear(nn.Module):
    """A bias-free linear layer whose weight stays in GGUF blocks (Q4_1 or Q8_0), for float32 inputs on a CPU with
    propd's extension.

    Calls within ``cpu_kernel.max_rows`` go to the block kernel; larger ones (prefill) multiply the weight
    dequantized for the call, by the same torch path the float32 ``KernelLinear`` takes at that row count, so every
    call gives the float32 model's bits. With 8-bit activations (panels from ``activations="q8"``, :attr:`q8`) every
    call goes to that kernel, whatever its row count (:func:`q8_linear_reference` without the extension).
    ``weight`` is the dense float32 matrix for code that reads it (draft projections): the ``dense`` tensor given (a
    tied embedding already in memory), else dequantized once and kept.
    """

    def __init__(self, packed: torch.Tensor, fmt: str, in_features: int, out_features: int,
                 dense: torch.Tensor | None = None):
        super().__init__()
        self.fmt, self.in_features, self.out_features = fmt, in_features, out_features
        self.register_buffer("packed", packed, persistent=False)
        self._dense = dense
        self.bias = None

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, fmt: str, in_features: int, out_features: int,
                    dense: torch.Tensor | None = None, activations: str = "float32") -> "QuantLinear":
        return cls(pack_blocks(blocks, fmt, out_features, in_features, activations), fmt, in_features, out_features,
                   dense)

    @classmethod
    def q8_from_float(cls, weight: torch.Tensor) -> "QuantLinear":
        """A float (O, K) weight, K a multiple of 32, rounded to Q8_0 (:func:`quantize_q8_0`), taking 8-bit
        activations."""
        O, K = weight.shape
        return cls.from_blocks(quantize_q8_0(weight), "Q8_0", K, O, activations="q8")

    @property
    def q8(self) -> bool:
        """Whether inputs are rounded to 8 bits per block of 32 (panels packed for 8-bit activations)."""
        return self.packed.dtype == torch.int8

    def dequantized(self) -> torch.Tensor:
        """The (O, K) float32 weight: the dense tensor if one is kept, else computed now (by the extension where it
        is loaded) and not kept."""
        from propd.models import cpu_kernel

        if self._dense is not None:
            return self._dense
        if cpu_kernel.extension() is not None and self.packed.device.type == "cpu":
            return cpu_kernel.dequantize(self.packed, self.out_features)
        return dequantize_packed(self.packed, self.fmt, self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.dequantized()
        return self._dense

    def _kernel_weight(self, x: torch.Tensor, rows: int) -> torch.Tensor | None:
        """The packed blocks if ``forward(x)`` goes to the block kernel (see ``KernelLinear._kernel_weight``)."""
        from propd.models import cpu_kernel

        if x.dtype != torch.float32 or not 1 <= rows <= cpu_kernel.max_rows(x.dtype) or not cpu_kernel.serves(x):
            return None
        return self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from propd.models import cpu_kernel
        from propd.models.cpu_modules import torch_linear

        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if self.q8:  # every row count, prefill included, takes the 8-bit arithmetic (row-invariant)
            x2 = x.reshape(rows, x.shape[-1]).float().contiguous()
            if x.device.type == "cpu" and cpu_kernel.extension() is not None:
                y = cpu_kernel.linear(x2, self.packed, self.out_features)
            else:
                y = q8_linear_reference(x2, self.packed, self.out_features)
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        packed = self._kernel_weight(x, rows)
        if packed is None:
            return torch_linear(x, self.dequantized().to(x.dtype), None, rows)
        y = cpu_kernel.linear(x.reshape(rows, x.shape[-1]).contiguous(), packed, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"
                + (", activations=q8" if self.q8 else ""))


# GGUF tensor names of a Llama model (llama.cpp's) -> the HF module names propd's LlamaModel uses
_LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens"
    if gguf_name == "output.weight":
        return "lm_head"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def _unpermute_rows(blocks: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row permutation of q and k (its converter interleaves each head's two halves; the
    reverse transformers applies when it reads GGUF): rows (heads, 2, dim / 2) from (heads, dim / 2, 2)."""
    rows = blocks.shape[0]
    half = rows // heads // 2
    return blocks.reshape(heads, half, 2, -1).transpose(1, 2).reshape(rows, -1)


# ggml type ids (ggml.h) of the block formats kept, and GGUF metadata value types' sizes (gguf.md)
_GGML_TYPES = {3: "Q4_1", 8: "Q8_0"}
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


def _gguf_tensor_infos(path) -> tuple[list[tuple[str, tuple[int, ...], int, int]], int]:
    """The tensor table of a GGUF file (v2/v3, gguf.md): [(name, dims (ne0 first), ggml type, offset)] and the byte
    offset where tensor data starts. Reads the header alone, skipping metadata values (the tokenizer's ~100k strings)
    by their lengths instead of decoding them."""
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise PropdError(f"{path} is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version < 2:
            raise PropdError(f"{path} is GGUF version {version}; propd reads versions 2 and 3")
        pos, alignment = 24, 32

        def string(pos: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", mm, pos)
            return mm[pos + 8:pos + 8 + n].decode("utf-8", "replace"), pos + 8 + n

        def skip(vtype: int, pos: int) -> int:
            if vtype == _STRING:
                return pos + 8 + struct.unpack_from("<Q", mm, pos)[0]
            if vtype == _ARRAY:
                itype, count = struct.unpack_from("<IQ", mm, pos)
                pos += 12
                if itype in _SCALAR_BYTES:
                    return pos + count * _SCALAR_BYTES[itype]
                for _ in range(count):
                    pos = skip(itype, pos)
                return pos
            return pos + _SCALAR_BYTES[vtype]

        for _ in range(n_kv):
            key, pos = string(pos)
            (vtype,) = struct.unpack_from("<I", mm, pos)
            pos += 4
            if key == "general.alignment" and vtype == _UINT32:
                (alignment,) = struct.unpack_from("<I", mm, pos)
            pos = skip(vtype, pos)
        infos = []
        for _ in range(n_tensors):
            name, pos = string(pos)
            (nd,) = struct.unpack_from("<I", mm, pos)
            dims = struct.unpack_from(f"<{nd}Q", mm, pos + 4)
            ttype, offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * nd)
            pos += 4 + 8 * nd + 12
            infos.append((name, tuple(int(d) for d in dims), ttype, int(offset)))
        return infos, -(-pos // alignment) * alignment


def read_gguf_blocks(path, cfg) -> dict[str, tuple[str, torch.Tensor]]:
    """The Q4_1 and Q8_0 matrices of a Llama GGUF file: HF module name -> (format, blocks (O, row bytes) uint8), rows
    in the HF order (q and k un-permuted)."""
    import numpy as np

    try:
        infos, start = _gguf_tensor_infos(path)
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except PropdError:
        raise
    except Exception as exc:  # struct.error, UnicodeError, OSError on a damaged file
        raise PropdError(f"cannot read GGUF blocks from {path}: {type(exc).__name__}") from None
    out = {}
    for gname, dims, ttype, offset in infos:
        fmt, name = _GGML_TYPES.get(ttype), _hf_name(gname)
        if name is None or fmt not in BLOCK_BYTES or len(dims) != 2 or dims[0] % QK:
            continue
        nbytes = dims[1] * dims[0] // QK * BLOCK_BYTES[fmt]
        if start + offset + nbytes > data.shape[0]:
            raise PropdError(f"{path} is truncated: tensor {gname} ends past the end of the file")
        blocks = torch.from_numpy(np.array(data[start + offset:start + offset + nbytes])).reshape(dims[1], -1)
        if gname.endswith("attn_q.weight"):
            blocks = _unpermute_rows(blocks, cfg.num_heads)
        elif gname.endswith("attn_k.weight"):
            blocks = _unpermute_rows(blocks, cfg.num_kv_heads)
        out[name] = (fmt, blocks)
    return out


def quantize_model(model, blocks: dict[str, tuple[str, torch.Tensor]], source: str = "the GGUF file",
                   activations: str = "float32") -> int:
    """Replace ``model``'s float32 linear layers (and a tied ``lm_head``) with :class:`QuantLinear` from ``blocks``
    (:func:`read_gguf_blocks`), after checking that each packed matrix dequantizes to the layer's weight bit for bit
    (a file that does not match the loaded weights raises). ``activations="q8"``: every matrix takes 8-bit
    activations (llama.cpp's arithmetic, :func:`q8_linear_reference`). Returns the number of layers replaced."""
    if activations not in ACTIVATIONS:
        raise PropdError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    modules = dict(model.named_modules())
    tied = model.cfg.tie_word_embeddings
    replaced = 0
    for name, (fmt, b) in blocks.items():
        target = "lm_head" if name == "model.embed_tokens" and tied else name
        if name == "model.embed_tokens" and not tied:
            continue  # an untied embedding is only looked up: it stays float32
        lin = modules.get(target)
        if lin is None or not isinstance(lin, nn.Linear) or lin.bias is not None:
            continue
        O, K = lin.weight.shape
        if b.shape[0] != O or b.numel() != O * (K // QK) * BLOCK_BYTES[fmt] or K % QK:
            raise PropdError(f"{source}: {name} is {fmt} of {b.shape[0]} rows, the model's layer is {O} x {K}")
        q = QuantLinear.from_blocks(b, fmt, K, O, activations=activations)
        if not torch.equal(q.dequantized(), lin.weight.detach().float()):  # the kernel's weights, as packed
            raise PropdError(f"{source}: {name}'s {fmt} blocks do not dequantize to the loaded weights "
                             "(a different model or conversion)")
        if target == "lm_head" and tied:
            q._dense = model.model.embed_tokens.weight
        parent, _, attr = target.rpartition(".")
        setattr(modules[parent] if parent else model, attr, q)
        replaced += 1
    return replaced
