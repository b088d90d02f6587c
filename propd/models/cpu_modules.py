"""The CPU extension's modules, swapped into a :class:`propd.models.llama.LlamaModel` by its ``prepare()`` on a CPU
(the way gpt-fast swaps modules), so that ``llama.py`` stays a plain reference forward.

Each class subclasses the reference module and sends a call to :mod:`propd.models.cpu_kernel` when the kernel serves
it (a CPU tensor of a type it takes, shapes within its bounds, no gradient wanted), else to the reference forward.
The kernels' results do not depend on the other rows or queries of a call, which keeps decoding lossless in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from propd.models import cpu_kernel
from propd.models.cache import KVCache
from propd.models.llama import Attention, AttentionInputs, DecoderLayer, RMSNorm, tensor_version, weight_key
from propd.models.quant import QuantLinear


class KernelLinear(nn.Linear):
    """``nn.Linear`` with CPU kernel choices for the few rows of a decoding step.

    A tree step multiplies every weight matrix by a few to a few hundred rows (one per tree node and row of the
    batch), and an AR step by one per row; MKL's general matrix product runs these far below the memory bandwidth. In
    float32 on CPU:

    * 1-128 rows, 1-1024 on AVX-512 (``cpu_kernel.max_rows``), go to propd's packed kernel
      (:mod:`propd.models.cpu_kernel`; AVX2, or AVX-512 where the CPU has it) where it is available: the weight is
      packed once into 16-row panels and streamed once per call. bfloat16 weights go to it at any row count.
      ``python benchmarks/linear_kernel.py`` compares it with the MKL forms below on the default model's matrices.
    * Otherwise 1-256 rows compute ``(W @ x^T)^T`` instead of ``x @ W^T``: on CPU builds of torch with MKL,
      ``F.linear`` for 2 <= M <= 256 rows runs 1.1-2.9x slower than that (equal from M = 192;
      ``benchmarks/linear_kernel.py``, figures in docs/lab). At M = 1 the row is stacked twice, since MKL's
      matrix-matrix product beats its matrix-vector one.
    * In bfloat16 without the kernel, ``(W @ x^T)^T`` does not pay on a CPU without native bf16 arithmetic, so it is
      ``F.linear``.

    Results equal ``F.linear``'s up to float summation order. On other devices this is ``nn.Linear``.
    """

    SKINNY_ROWS = (1, 256)

    def _rows(self, x: torch.Tensor) -> int:
        return x.numel() // x.shape[-1] if x.shape[-1] else 0

    def skinny(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` computes ``(W @ x^T)^T`` (float32 on CPU, 1-256 rows) rather than ``F.linear``."""
        lo, hi = self.SKINNY_ROWS
        return x.device.type == "cpu" and x.dtype == torch.float32 and lo <= self._rows(x) <= hi

    def packed(self) -> torch.Tensor | None:
        """The weight packed for the CPU kernel, or None: packed on first use, and again when the weight is replaced or
        changed in place (``load_state_dict``)."""
        w = self.weight
        key = weight_key(w)
        cached = getattr(self, "_packed", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        p = cpu_kernel.pack(w)
        self._packed = (key, p)
        return p

    @classmethod
    def from_rows(cls, weight: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype | None = None) -> "KernelLinear":
        """A bias-free projection onto rows ``ids`` of ``weight`` (V, H), gathered once (a draft vocabulary's slice of
        an ``lm_head``), in ``dtype`` (default: the weight's), without gradients."""
        dtype = dtype or weight.dtype
        proj = cls(weight.shape[1], ids.numel(), bias=False, device=weight.device, dtype=dtype).requires_grad_(False)
        proj.weight.data = weight.detach().index_select(0, ids.to(weight.device)).to(dtype).contiguous()
        return proj

    def prepare(self) -> None:  # noqa: D401
        """Pack the weight now if decoding steps will send it to the CPU kernel (see :meth:`packed`), so that the
        packing (about 0.4 s for the default model's layers) is not paid inside the first timed step."""
        w = self.weight
        if w.device.type == "cpu" and w.dtype in cpu_kernel.DTYPES and cpu_kernel.extension() is not None:
            self.packed()

    def _kernel_weight(self, x: torch.Tensor, rows: int) -> torch.Tensor | None:
        """The packed weight if ``forward(x)`` goes to the packed CPU kernel: a CPU input of the weight's dtype, one
        the kernel takes, within its row bound, and no gradient wanted (the kernel has no backward); else None."""
        if not (1 <= rows <= cpu_kernel.max_rows(x.dtype) and cpu_kernel.serves(x, self.weight)):
            return None
        return self.packed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._rows(x)
        packed = self._kernel_weight(x, rows)
        if packed is None:
            return torch_linear(x, self.weight, self.bias, rows)
        y = cpu_kernel.linear(x.reshape(rows, x.shape[-1]).contiguous(), packed, self.out_features)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)


def torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
    """``x @ weight^T + bias`` by torch, in the form :class:`KernelLinear` picks without the kernel: ``(W @ x^T)^T``
    for 1-256 float32 rows on a CPU (a matrix-vector product as two stacked rows), else ``F.linear``."""
    lo, hi = KernelLinear.SKINNY_ROWS
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and lo <= rows <= hi):
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, x.shape[-1])
    if rows == 1:  # a matrix-matrix product of two copies beats the matrix-vector product (KernelLinear's docstring)
        x2 = torch.cat([x2, x2])
    y = (weight @ x2.t())[:, :rows].t()  # (rows, out), column-major
    y = y.contiguous()  # row-major, as F.linear returns (attention kernels want contiguous heads)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.shape[0])


class KernelRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernel.rms_norm_fits(x, self.weight):  # one call (cpu_kernel.rms_norm)
            return cpu_kernel.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class KernelAttention(Attention):
    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, a: AttentionInputs) -> torch.Tensor:
        cache_k, cache_v = cache.layer(layer)
        if not cpu_kernel.rope_fits(x, cache_k):  # (the projections keep x's type and device)
            return super().forward(x, layer, cache, a)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = cpu_kernel.rope_and_cache(q, k, v, a.cos, a.sin, cache_k, cache_v, a.write_pos)  # (B, Hq, T, D)
        keys, values = cache.view(layer, a.key_len)  # (B, Hk, S, D)
        return self.attend(q, keys, values, a)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, a: AttentionInputs) -> torch.Tensor:
        if cpu_kernel.attention_fits(q, keys, a.decoding, _exact(self)):  # decoding steps (cpu_kernel.attention)
            return self.o_proj(cpu_kernel.attention(q, keys, values, a.mask[:, 0], self.cfg.head_dim ** -0.5,
                                                    _invariant(self, q.dtype)))
        if a.causal and cpu_kernel.causal_fits(q, keys):  # a prefill chunk without padding
            S = a.key_len - 1
            return self.o_proj(cpu_kernel.causal_attention(q, keys[:, :, :S], values[:, :, :S],
                                                           self.cfg.head_dim ** -0.5))
        return super().attend(q, keys, values, a)


def _invariant(attn: nn.Module, dtype: torch.dtype) -> bool:
    """Whether a decoding step's attention must keep each row's bits whatever the rows beside it
    (``cpu_kernel.rounds_to_tokens``; see ``cpu_kernel.attention``)."""
    return cpu_kernel.rounds_to_tokens(dtype, _exact(attn))


def _exact(attn: nn.Module) -> bool:
    """Whether ``attn``'s products take 8-bit activations (``gguf-q8``): then every decoding step's attention goes to
    the row-invariant kernel (``cpu_kernel.attention_limit``)."""
    return getattr(attn.q_proj, "q8", False)


def _fused_key(x: torch.Tensor, cache_k: torch.Tensor, decoding: bool, exact: bool = False) -> tuple:
    """What, besides the weights, decides whether a layer's call can be fused (``KernelDecoderLayer._check_fused``)."""
    B, T, _ = x.shape
    return (x.dtype, x.device, cache_k.dtype, cache_k.stride(-1), decoding, torch.is_grad_enabled(),
            T <= cpu_kernel.attention_limit(x.dtype, decoding, exact), 1 <= B * T <= cpu_kernel.max_rows(x.dtype))


class KernelDecoderLayer(DecoderLayer):
    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, a: AttentionInputs) -> torch.Tensor:
        cache_k, cache_v = cache.layer(layer)
        fused = self._fused_weights(x, cache_k, a.decoding)
        if fused is not None:  # the same computation in one call (cpu_kernel.decoder_layer)
            weights, outs = fused
            cos, sin, pos, mask = _layer_inputs(a)
            return cpu_kernel.decoder_layer(x, weights, outs, cos, sin, cache_k, cache_v, pos, mask,
                                            self.input_layernorm.eps, self.self_attn.cfg.head_dim ** -0.5,
                                            _invariant(self.self_attn, x.dtype))
        return super().forward(x, layer, cache, a)

    def _fused_weights(self, x: torch.Tensor, cache_k: torch.Tensor, decoding: bool = True
                       ) -> tuple[list, list] | None:
        """The packed weights and output sizes for :func:`cpu_kernel.decoder_layer` if every part of this call would
        go to the CPU extension anyway (decoding steps of up to ``ATTENTION_MAX_QUERIES`` tokens, rows within the
        linear kernel's bound, no biases, no gradient), else None.

        Kept between calls (the checks cost tens of microseconds of Python per layer, a step's worth over a model's
        layers): the answer depends only on the key below and on the weights, checked to be the same tensors,
        unchanged in place."""
        key = _fused_key(x, cache_k, decoding, _exact(self.self_attn))
        hit = self.__dict__.get("_fused")
        if hit is not None and hit[0] == key and all(
                store.get(name) is t and tensor_version(t) == v for store, name, t, v in hit[2]):
            return hit[1]
        fused = self._check_fused(x, cache_k, decoding)
        mods = (self.input_layernorm, self.post_attention_layernorm, *self._linears())
        stamps = []
        for mod in mods:
            store, name = ((mod._buffers, "packed") if isinstance(mod, QuantLinear) else
                           (mod._parameters, "weight") if "weight" in mod._parameters else (mod._buffers, "weight"))
            t = store.get(name)
            stamps.append((store, name, t, tensor_version(t) if t is not None else None))
        self.__dict__["_fused"] = (key, fused, stamps)
        return fused

    def _linears(self) -> tuple:
        attn, mlp = self.self_attn, self.mlp
        return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def _check_fused(self, x: torch.Tensor, cache_k: torch.Tensor, decoding: bool) -> tuple[list, list] | None:
        B, T, H = x.shape
        c = self.self_attn.cfg
        linears = self._linears()
        if (T > cpu_kernel.attention_limit(x.dtype, decoding, _exact(self.self_attn)) or torch.is_grad_enabled()
                or c.attention_bias
                or c.mlp_bias or c.head_dim % 8 or H % 8 or cache_k.stride(-1) != 1
                or not cpu_kernel.serves(x, cache_k, self.input_layernorm.weight, self.post_attention_layernorm.weight)
                or not all(isinstance(lin, (KernelLinear, QuantLinear)) for lin in linears)):
            return None
        # each product's kernel weight (float32 or bf16 panels, or GGUF blocks), None where it would not go to the
        # kernel (a row count beyond its bound, another dtype, the packing memory cap)
        packed = [lin._kernel_weight(x, B * T) for lin in linears]
        if any(p is None for p in packed):
            return None
        weights = [self.input_layernorm.weight, *packed[:4], self.post_attention_layernorm.weight, *packed[4:]]
        return weights, [lin.out_features for lin in linears]


def _still(stack, stamps: list) -> bool:
    """Whether the weights ``stamps`` recorded are still the modules' tensors, unchanged in place (the stack checks
    the change counters in C++, where 270 of them cost about a microsecond)."""
    if stack is not None and not stack.current():
        return False
    if stack is None and not all(t is None or tensor_version(t) == v for _, _, t, v in stamps):
        return False
    return all(store.get(name) is t for store, name, t, _ in stamps)


class _Stacks(dict):
    """A model's ``LayerStack``s by key; never copied with the model (a copy holds its own weights; the extension's
    objects cannot be copied or pickled)."""

    def __deepcopy__(self, memo) -> "_Stacks":
        return _Stacks()

    def __reduce__(self):
        return _Stacks, ()


def run_layers_fused(model, h: torch.Tensor, start: int, end: int, cache: KVCache, a: AttentionInputs
                     ) -> torch.Tensor | None:
    """Layers ``start .. end - 1`` of a decoding step in one extension call (``LayerStack``: each layer's
    :func:`cpu_kernel.decoder_layer` in turn, the same bits) when every layer would take its fused call anyway, else
    None. What goes is a step's per-layer Python (module calls, checks).

    The stack is kept between calls under the same key as ``KernelDecoderLayer._fused_weights`` and the weights'
    stamps (every layer's weights the same tensors, unchanged in place)."""
    layers = model.model.layers
    cache_k = cache.k[0]
    key = (*_fused_key(h, cache_k, a.decoding, _exact(layers[0].self_attn)), len(layers))
    stacks = model.__dict__.get("_stacks")
    if stacks is None:
        stacks = model.__dict__["_stacks"] = _Stacks()  # one per key: steps of different kinds alternate
    hit = stacks.get(key)
    if hit is None or not _still(hit[1], hit[2]):
        stack, stamps = None, []
        if all(type(layer) is KernelDecoderLayer for layer in layers):
            fused = [layer._fused_weights(h, cache_k, a.decoding) for layer in layers]
            stamps = [s for layer in layers for s in layer.__dict__["_fused"][2]]  # a "no" is re-checked as well
            first = layers[0]
            eps, scale = first.input_layernorm.eps, first.self_attn.cfg.head_dim ** -0.5
            if all(f is not None and f[1] == fused[0][1] for f in fused) and all(
                    layer.input_layernorm.eps == eps and layer.post_attention_layernorm.eps == eps for layer in layers):
                stack = cpu_kernel.extension().LayerStack([w for f in fused for w in f[0]], fused[0][1], eps, scale,
                                                          [t for _, _, t, _ in stamps if t is not None],
                                                          _invariant(first.self_attn, h.dtype))
        hit = stacks[key] = (key, stack, stamps)
    if hit[1] is None:
        return None
    cos, sin, pos, mask = _layer_inputs(a)
    return hit[1].run(h.contiguous(), cos, sin, cache.k, cache.v, pos, mask, start, end)


_last_inputs: tuple = (None, None)  # (AttentionInputs, its tensors for the kernel): every layer of a call shares them


def _layer_inputs(a: AttentionInputs) -> tuple[torch.Tensor, ...]:
    """``a``'s cos, sin, write positions and (B, T, S) mask, contiguous, made once per call rather than per layer."""
    global _last_inputs
    last = _last_inputs  # one read: another thread may replace it, never half of it
    if last[0] is not a:
        last = _last_inputs = (a, (a.cos.contiguous(), a.sin.contiguous(), a.write_pos.contiguous(),
                                   a.mask[:, 0].contiguous()))
    return last[1]


SWAPS = {nn.Linear: KernelLinear, RMSNorm: KernelRMSNorm, Attention: KernelAttention, DecoderLayer: KernelDecoderLayer}


def swap_in(model: nn.Module, skip: tuple[type, ...] = ()) -> None:
    """Give every reference module of ``model`` its kernel class (in place: parameters and buffers stay), except the
    reference classes in ``skip``, and pack the linear layers' weights now. Idempotent."""
    for mod in model.modules():
        cls = SWAPS.get(type(mod))
        if cls is not None and type(mod) not in skip:
            mod.__class__ = cls
    for mod in model.modules():
        if isinstance(mod, KernelLinear):
            mod.prepare()
