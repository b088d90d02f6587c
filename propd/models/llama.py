"""A Llama-architecture causal LM forward for batched tree decoding.

Implements the Llama architecture (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models":
RMSNorm, rotary position embeddings (Su et al. 2021, "RoFormer"), SwiGLU MLP, grouped-query attention) with what
parallel decoding needs and ``transformers``' forward does not give:

* B rows, each with its own committed length in a static KV cache (:class:`propd.models.cache.KVCache`);
* T new tokens per row laid out as a token tree: per-row positions (``length + depth``) and an ancestor mask;
* a layer range per call, so a pruner can drop tree nodes after layer n and layers n..L-1 only see survivors;
* logits computed only for the hidden states the caller asks for.

Parameter names follow ``transformers``' ``LlamaForCausalLM`` so its state dict loads as is.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from propd.errors import PropdError
from propd.models import cpu_kernel
from propd.models.cache import KVCache
from propd.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernel.rms_norm_fits(x, self.weight):  # one call, on CPU (cpu_kernel.rms_norm)
            return cpu_kernel.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def tensor_version(t: torch.Tensor) -> int | None:
    """``t``'s in-place change counter, for caches derived from it; None for inference tensors, which have none (and
    cannot be changed in place outside inference mode)."""
    return None if t.is_inference() else t._version


class Linear(nn.Linear):
    """``nn.Linear`` with CPU kernel choices for the few rows of a decoding step.

    A tree step multiplies every weight matrix by 2-64 rows (one per tree node and row of the batch), and an AR step
    by one per row; MKL's general matrix product runs these far below the memory bandwidth. In float32 on CPU:

    * 1-64 rows (``cpu_kernel.MAX_ROWS``) go to propd's packed AVX2 kernel (:mod:`propd.models.cpu_kernel`) where it
      is available: the weight is packed once into 16-row panels and streamed once per call. bfloat16 weights go to
      it at any row count (torch's bf16 products are far slower on CPUs without bf16 arithmetic).
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
        key = (w.data_ptr(), tensor_version(w), tuple(w.shape))
        cached = getattr(self, "_packed", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        p = cpu_kernel.pack(w)
        self._packed = (key, p)
        return p

    def prepare(self) -> None:
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
        if packed is not None:
            y = cpu_kernel.linear(x.reshape(rows, x.shape[-1]).contiguous(), packed, self.out_features)
        else:
            if not self.skinny(x):
                return F.linear(x, self.weight, self.bias)
            x2 = x.reshape(rows, x.shape[-1])
            if rows == 1:  # a matrix-matrix product of two copies beats the matrix-vector product (class docstring)
                x2 = torch.cat([x2, x2])
            y = (self.weight @ x2.t())[:, :rows].t()  # (rows, out), column-major
            y = y.contiguous()  # row-major, as F.linear returns (attention kernels want contiguous heads)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)


@attrs.frozen
class AttentionInputs:
    """Where T query tokens sit and what they may see; shared by every layer of one call."""

    cos: torch.Tensor  # (B, 1, T, D) rotary cos at each token's position
    sin: torch.Tensor  # (B, 1, T, D)
    write_pos: torch.Tensor  # (B, T) cache positions the tokens' keys/values go to
    mask: torch.Tensor  # (B, 1, T, S) bool, True = may attend
    key_len: int  # S: cache positions [0, S) are read
    decoding: bool = True  # a decoding step (False: a prefill), for the CPU kernels' choice


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hq, hk, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, hq * d, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, hk * d, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, hk * d, bias=cfg.attention_bias)
        self.o_proj = Linear(hq * d, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, a: AttentionInputs) -> torch.Tensor:
        B, T, _ = x.shape
        c = self.cfg
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        cache_k, cache_v = cache.layer(layer)
        if cpu_kernel.rope_fits(q, cache_k):  # the same values as below, in one call (cpu_kernel.rope_and_cache)
            q = cpu_kernel.rope_and_cache(q, k, v, a.cos, a.sin, cache_k, cache_v, a.write_pos)  # (B, Hq, T, D)
        else:
            q = q.view(B, T, c.num_heads, c.head_dim).transpose(1, 2)  # (B, Hq, T, D)
            k = k.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hk, T, D)
            v = v.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hk, T, D)
            q = q * a.cos + _rotate_half(q) * a.sin
            k = k * a.cos + _rotate_half(k) * a.sin
            cache.write(layer, a.write_pos, k, v)
        keys, values = cache.view(layer, a.key_len)  # (B, Hk, S, D)
        if cpu_kernel.attention_fits(q, keys, a.decoding):  # decoding steps on CPU (cpu_kernel.attention)
            return self.o_proj(cpu_kernel.attention(q, keys, values, a.mask[:, 0], c.head_dim ** -0.5))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=a.mask,
                                             enable_gqa=c.num_heads != c.num_kv_heads)  # (B, Hq, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, c.num_heads * c.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, a: AttentionInputs) -> torch.Tensor:
        cache_k, cache_v = cache.layer(layer)
        fused = self._fused_weights(x, cache_k, a.decoding)
        if fused is not None:  # the same computation in one call (cpu_kernel.decoder_layer)
            weights, outs = fused
            return cpu_kernel.decoder_layer(x, weights, outs, a.cos, a.sin, cache_k, cache_v, a.write_pos, a.mask[:, 0],
                                            self.input_layernorm.eps, self.self_attn.cfg.head_dim ** -0.5)
        x = x + self.self_attn(self.input_layernorm(x), layer, cache, a)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _fused_weights(self, x: torch.Tensor, cache_k: torch.Tensor, decoding: bool = True
                       ) -> tuple[list, list] | None:
        """The packed weights and output sizes for :func:`cpu_kernel.decoder_layer` if every part of this call would
        go to the CPU extension anyway (decoding steps of up to ``ATTENTION_MAX_QUERIES`` tokens, rows within the
        linear kernel's bound, no biases, no gradient), else None."""
        B, T, H = x.shape
        attn, mlp = self.self_attn, self.mlp
        c = attn.cfg
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if (T > cpu_kernel.attention_limit(x.dtype, decoding) or not 1 <= B * T <= cpu_kernel.max_rows(x.dtype)
                or torch.is_grad_enabled() or c.attention_bias or c.mlp_bias or c.head_dim % 8 or H % 8
                or cache_k.stride(-1) != 1
                or not cpu_kernel.serves(x, cache_k, self.input_layernorm.weight, self.post_attention_layernorm.weight,
                                         *(lin.weight for lin in linears))):
            return None
        packed = [lin.packed() for lin in linears]
        if any(p is None for p in packed):  # over the packing memory cap
            return None
        weights = [self.input_layernorm.weight, *packed[:4], self.post_attention_layernorm.weight, *packed[4:]]
        return weights, [lin.out_features for lin in linears]


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def prefill_groups(lengths: list[int], waste: float) -> list[list[int]]:
    """Split rows (by prompt length) into prefill groups: longest first, a row joins the current group while the
    group padded to its longest stays within ``(1 + waste)`` times its real tokens; otherwise it starts a new one."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        g = groups[-1] if groups else None
        if g is not None and (len(g) + 1) * lengths[g[0]] <= (1 + waste) * (sum(lengths[j] for j in g) + lengths[i]):
            g.append(i)
        else:
            groups.append([i])
    return groups


class LlamaModel(nn.Module):
    """The causal LM. Use :meth:`embed`, :meth:`run_layers`, :meth:`norm` and :meth:`logits` in sequence."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", cfg.inv_freq(), persistent=False)

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def prepare(self) -> None:
        """Do the one-time work of the first decoding step now (packing weights for the CPU kernel)."""
        for mod in self.modules():
            if isinstance(mod, Linear):
                mod.prepare()

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.cfg
        return KVCache(c.num_layers, batch, c.num_kv_heads, capacity, c.head_dim, self.dtype, self.device)

    def attention_inputs(self, cache: KVCache, node_idx: torch.Tensor, tree_mask: torch.Tensor,
                         depths: torch.Tensor, decoding: bool = True) -> AttentionInputs:
        """Positions and masks for query nodes ``node_idx`` (B, Tq) of a tree of T nodes.

        ``node_idx`` entries equal to T are padding (rows with fewer nodes than the widest row); they write to a
        spare scratch slot and attend only to it, so they stay finite and invisible. ``tree_mask`` (T, T) and
        ``depths`` (T,) describe a tree shared by all rows (``propd.tree.DraftTree``), or (B, T, T) and (B, T) one
        tree per row (``propd.tree.RowTrees``). Key length S = longest row + T + 1.
        """
        dev = node_idx.device
        B = node_idx.shape[0]
        T = tree_mask.shape[-1]
        lengths = cache.lengths
        S = max(cache.host_lengths) + T + 1
        if tree_mask.dim() == 2:
            mask_ext = torch.zeros(T + 1, T + 1, dtype=torch.bool, device=dev)
            mask_ext[:T, :T] = tree_mask
            mask_ext[T, T] = True
            rows = mask_ext[node_idx]  # (B, Tq, T+1)
            depth_ext = torch.cat([depths, depths.new_zeros(1)])
            node_depth = depth_ext[node_idx]  # (B, Tq)
        else:
            mask_ext = torch.zeros(B, T + 1, T + 1, dtype=torch.bool, device=dev)
            mask_ext[:, :T, :T] = tree_mask
            mask_ext[:, T, T] = True
            rows = mask_ext.gather(1, node_idx[..., None].expand(-1, -1, T + 1))  # (B, Tq, T+1)
            node_depth = torch.cat([depths, depths.new_zeros(B, 1)], dim=1).gather(1, node_idx)  # (B, Tq)
        rel = torch.arange(S, device=dev)[None, :] - lengths[:, None]  # (B, S) key pos relative to row length
        in_tree = (rel >= 0) & (rel <= T)
        tree_part = rows.gather(2, rel.clamp(0, T)[:, None, :].expand(-1, node_idx.shape[1], -1))  # (B, Tq, S)
        mask = (tree_part & in_tree[:, None, :]) | (rel < 0)[:, None, :]
        positions = lengths[:, None] + node_depth  # (B, Tq)
        freqs = positions[..., None].to(torch.float32) * self.inv_freq  # (B, Tq, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, Tq, D)
        scale = self.cfg.rope_attention_scaling
        return AttentionInputs(
            cos=(emb.cos() * scale).to(self.dtype), sin=(emb.sin() * scale).to(self.dtype),
            write_pos=lengths[:, None] + node_idx, mask=mask[:, None], key_len=S, decoding=decoding,
        )

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)

    def run_layers(self, h: torch.Tensor, start: int, end: int, cache: KVCache, a: AttentionInputs) -> torch.Tensor:
        for i in range(start, end):
            h = self.model.layers[i](h, i, cache, a)
        return h

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.norm(h)

    def logits(self, h_normed: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h_normed)

    # a prefill group pads its rows to its longest prompt by at most this share of its real tokens
    PREFILL_WASTE = 0.125

    def prefill(self, cache: KVCache, prompts: list[list[int]], keep_hidden: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run prompts of different lengths into an empty cache; return the normed last hidden state (B, H), and with
        ``keep_hidden`` also every position's (B, P, H), padded past each prompt's length.

        Rows run in groups of similar length (``prefill_groups``), each group into a cache of its own whose keys and
        values are then copied into the batch's rows, so the work is in proportion to the real tokens, not to batch x
        longest prompt (and attention to batch x longest^2)."""
        if max(cache.host_lengths, default=0) > 0:
            raise PropdError("prefill runs prompts into an empty cache")
        host_lens = [len(p) for p in prompts]
        groups = prefill_groups(host_lens, self.PREFILL_WASTE)
        lens = torch.tensor(host_lens, dtype=torch.long, device=self.device)
        if len(groups) == 1:
            final, _ = self.hidden_states(cache, prompts)
            last = final[torch.arange(len(prompts), device=self.device), lens - 1]
            return (last, final) if keep_hidden else last
        last = torch.empty(len(prompts), self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        full = (torch.zeros(len(prompts), max(host_lens), self.cfg.hidden_size, dtype=self.dtype, device=self.device)
                if keep_hidden else None)
        for rows in groups:
            seqs = [prompts[r] for r in rows]
            longest = max(len(q) for q in seqs)
            part = self.new_cache(len(rows), longest + 2)  # + the padding's scratch slot
            final, _ = self.hidden_states(part, seqs)
            idx = torch.tensor(rows, dtype=torch.long, device=self.device)
            cache.k[:, idx, :, :longest] = part.k[:, :, :, :longest]
            cache.v[:, idx, :, :longest] = part.v[:, :, :, :longest]
            last[idx] = final[torch.arange(len(rows), device=self.device), lens[idx] - 1]
            if full is not None:
                full[idx, :longest] = final
        cache.advance(lens, host_lens)
        return (last, full) if keep_hidden else last

    def hidden_states(self, cache: KVCache, seqs: list[list[int]], capture: tuple[int, ...] = ()
                      ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run whole sequences (different lengths) into an empty cache and advance it.

        Returns the final normed hidden states (B, N, H) and, for each n in ``capture``, the hidden states after n
        layers (B, N, H); positions past a row's length are padding.
        """
        dev = self.device
        n = len(seqs)
        longest = max(len(p) for p in seqs)
        tokens = torch.zeros(n, longest, dtype=torch.long, device=dev)
        lens = torch.tensor([len(p) for p in seqs], dtype=torch.long, device=dev)
        for i, p in enumerate(seqs):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        ar = torch.arange(longest, device=dev)
        node_idx = torch.where(ar[None, :] < lens[:, None], ar[None, :], torch.full_like(tokens, longest))
        causal = torch.tril(torch.ones(longest, longest, dtype=torch.bool, device=dev))
        a = self.attention_inputs(cache, node_idx, causal, ar, decoding=False)
        h = self.embed(tokens)
        captured, start = {}, 0
        for layer in sorted(set(capture)):
            h = self.run_layers(h, start, layer, cache, a)
            captured[layer], start = h, layer
        h = self.run_layers(h, start, self.num_layers, cache, a)
        cache.advance(lens, [len(p) for p in seqs])
        return self.norm(h), captured
