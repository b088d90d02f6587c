"""A Llama-architecture causal LM forward for batched tree decoding.

Implements the Llama architecture (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models":
RMSNorm, rotary position embeddings (Su et al. 2021, "RoFormer"), SwiGLU MLP, grouped-query attention) with what
parallel decoding needs and ``transformers``' forward does not give:

* B rows, each with its own committed length in a static KV cache (:class:`propd.models.cache.KVCache`);
* T new tokens per row laid out as a token tree: per-row positions (``length + depth``) and an ancestor mask;
* a layer range per call, so a pruner can drop tree nodes after layer n and layers n..L-1 only see survivors;
* logits computed only for the hidden states the caller asks for.

Parameter names follow ``transformers``' ``LlamaForCausalLM`` so its state dict loads as is. This is the plain
reference forward; on a CPU, :meth:`LlamaModel.prepare` swaps in the extension's modules (:mod:`propd.models.cpu_modules`).
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
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def tensor_version(t: torch.Tensor) -> int | None:
    """``t``'s in-place change counter, for caches derived from it; None for inference tensors, which have none (and
    cannot be changed in place outside inference mode)."""
    return None if t.is_inference() else t._version


def weight_key(w: torch.Tensor) -> tuple:
    """What identifies a weight's current values for a cache derived from it (a packed copy, a screen): its storage,
    in-place change counter and shape."""
    return w.data_ptr(), tensor_version(w), tuple(w.shape)


Linear = nn.Linear  # the reference forward's linear layers; on CPU, prepare() swaps in cpu_modules.KernelLinear


@attrs.frozen
class AttentionInputs:
    """Where T query tokens sit and what they may see; shared by every layer of one call."""

    cos: torch.Tensor  # (B, 1, T, D) rotary cos at each token's position
    sin: torch.Tensor  # (B, 1, T, D)
    write_pos: torch.Tensor  # (B, T) cache positions the tokens' keys/values go to
    mask: torch.Tensor  # (B, 1, T, S) bool, True = may attend
    key_len: int  # S: cache positions [0, S) are read
    decoding: bool = True  # a decoding step (False: a prefill), for the CPU kernels' choice
    # the queries are positions S - T .. S - 1 of every row (S = key_len - 1: the last key is the padding's scratch
    # slot), with only earlier positions of the same prompt cached and no padding: the mask is the causal one over
    # keys [0, S), which a causal kernel computes without the masked part (SDPA's is_causal where S == T)
    causal: bool = False


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
        q = q.view(B, T, c.num_heads, c.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = k.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hk, T, D)
        v = v.view(B, T, c.num_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hk, T, D)
        q = q * a.cos + _rotate_half(q) * a.sin
        k = k * a.cos + _rotate_half(k) * a.sin
        cache.write(layer, a.write_pos, k, v)
        keys, values = cache.view(layer, a.key_len)  # (B, Hk, S, D)
        return self.attend(q, keys, values, a)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, a: AttentionInputs) -> torch.Tensor:
        """Attention of q (B, Hq, T, D) over the cache's keys and values, then the output projection (B, T, H)."""
        B, _, T, _ = q.shape
        c = self.cfg
        if a.causal and a.key_len - 1 == T:
            out = F.scaled_dot_product_attention(q, keys[:, :, :T], values[:, :, :T], is_causal=True,
                                                 enable_gqa=c.num_heads != c.num_kv_heads)  # (B, Hq, T, D)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=a.mask,
                                                 enable_gqa=c.num_heads != c.num_kv_heads)
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
        x = x + self.self_attn(self.input_layernorm(x), layer, cache, a)
        return x + self.mlp(self.post_attention_layernorm(x))


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


def prefill_chunks(lens: torch.Tensor, longest: int, chunk: int):
    """The chunks a prefill of rows of ``lens`` (B,) positions (padded to ``longest``) runs in: for each, its start,
    width T = min(chunk, longest - start) (the last chunk's padding slot stays within a cache of longest + 2), each
    row's real positions in it (B,) and the query node indices (B, T) with T for padding (a row whose positions ended
    sends only padding)."""
    for start in range(0, longest, chunk):
        T = min(chunk, longest - start)
        ar = torch.arange(T, device=lens.device)
        real = (lens - start).clamp(0, T)
        yield start, T, real, torch.where(ar[None, :] < real[:, None], ar[None, :], torch.full_like(ar, T)[None, :])


def tree_attention_inputs(cfg: ModelConfig, inv_freq: torch.Tensor, dtype: torch.dtype, cache: KVCache,
                          node_idx: torch.Tensor, tree_mask: torch.Tensor, depths: torch.Tensor,
                          decoding: bool = True) -> AttentionInputs:
    """Positions and masks for query nodes ``node_idx`` (B, Tq) of a tree of T nodes.

    ``node_idx`` entries equal to T are padding (rows with fewer nodes than the widest row); they write to a
    spare scratch slot and attend only to it, so they stay finite and invisible. ``tree_mask`` (T, T) and
    ``depths`` (T,) describe a tree shared by all rows (``propd.tree.DraftTree``), or (B, T, T) and (B, T) one
    tree per row (``propd.tree.RowTrees``). Key length S = longest row + T + 1.
    """
    dev = node_idx.device
    T = tree_mask.shape[-1]
    lengths = cache.lengths
    S = max(cache.host_lengths) + T + 1
    if T == 1 and node_idx.shape[1] == 1:  # an AR step: the root (never padding) sees the prefix and itself
        rel = torch.arange(S, device=dev)[None, :] - lengths[:, None]  # (B, S) key pos relative to row length
        return _attention_inputs(cfg, inv_freq, dtype, lengths[:, None], (rel <= 0)[:, None, None, :], lengths[:, None],
                                 S, decoding)
    if dev.type == "cpu" and cpu_kernel.extension() is not None:  # the same in one extension call
        mask, positions, write_pos = cpu_kernel.tree_mask(lengths, S, node_idx, tree_mask, depths)
    else:
        mask, positions, write_pos = tree_mask_torch(lengths, S, node_idx, tree_mask, depths)
    return _attention_inputs(cfg, inv_freq, dtype, positions, mask, write_pos, S, decoding)


def tree_mask_torch(lengths: torch.Tensor, S: int, node_idx: torch.Tensor, tree_mask: torch.Tensor,
                    depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`tree_attention_inputs`' (B, 1, Tq, S) mask, query positions (B, Tq) and write positions (B, Tq) by torch
    ops (any device; ``cpu_kernel.tree_mask`` computes the same in one call)."""
    dev, B, T = node_idx.device, node_idx.shape[0], tree_mask.shape[-1]
    rel = torch.arange(S, device=dev)[None, :] - lengths[:, None]  # (B, S) key pos relative to row length
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
    in_tree = (rel >= 0) & (rel <= T)
    tree_part = rows.gather(2, rel.clamp(0, T)[:, None, :].expand(-1, node_idx.shape[1], -1))  # (B, Tq, S)
    mask = (tree_part & in_tree[:, None, :]) | (rel < 0)[:, None, :]
    return mask[:, None], lengths[:, None] + node_depth, lengths[:, None] + node_idx


def _attention_inputs(cfg: ModelConfig, inv_freq: torch.Tensor, dtype: torch.dtype, positions: torch.Tensor,
                      mask: torch.Tensor, write_pos: torch.Tensor, S: int, decoding: bool) -> AttentionInputs:
    """Rotary cos/sin of query ``positions`` (B, Tq), with the (B, 1, Tq, S) ``mask`` and cache ``write_pos``."""
    freqs = positions[..., None].to(torch.float32) * inv_freq  # (B, Tq, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, Tq, D)
    scale = cfg.rope_attention_scaling
    return AttentionInputs(cos=(emb.cos() * scale).to(dtype), sin=(emb.sin() * scale).to(dtype),
                           write_pos=write_pos, mask=mask, key_len=S, decoding=decoding)


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
        return self.model.embed_tokens.weight.device  # (the lm_head may hold GGUF blocks: propd.models.quant)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def prepare(self) -> None:
        """Make the model ready to decode on its device: on a CPU, swap in the CPU kernel modules
        (:mod:`propd.models.cpu_modules`) and pack their weights now, not in the first (timed) step."""
        if self.device.type == "cpu":
            from propd.models import cpu_modules

            cpu_modules.swap_in(self)
            self.__dict__["fused_layers"] = cpu_modules.run_layers_fused

    def prepare_screen(self) -> None:
        """Build the argmax screen of the ``lm_head`` (:mod:`propd.models.screen`) where it applies: float32 or
        bfloat16 weights on a CPU with propd's extension, served by the packed kernel; or GGUF blocks (float32
        activations) whose dense float32 matrix is in memory anyway (a tied embedding), on a CPU with AVX512-VNNI,
        where the screen's 8-bit products cost less than the blocks' float32 arithmetic (``cpu_kernel.has_vnni``).
        Idempotent."""
        from propd.models.cpu_modules import KernelLinear
        from propd.models.quant import QuantLinear
        from propd.models.screen import ArgmaxScreen

        head = self.lm_head
        if isinstance(head, QuantLinear):
            w = head._dense if not head.q8 and cpu_kernel.has_vnni() else None
        else:
            w = head.weight if isinstance(head, KernelLinear) else None
        cached = self.__dict__.get("_screen")
        if w is None or not ArgmaxScreen.available(w):
            self.__dict__["_screen"] = None
            return
        key = weight_key(w)
        if cached is not None and cached[0] == key:
            return
        self.__dict__["_screen"] = (key, ArgmaxScreen(w.detach()))

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.cfg
        return KVCache(c.num_layers, batch, c.num_kv_heads, capacity, c.head_dim, self.dtype, self.device)

    def attention_inputs(self, cache: KVCache, node_idx: torch.Tensor, tree_mask: torch.Tensor,
                         depths: torch.Tensor, decoding: bool = True) -> AttentionInputs:
        """Positions and masks for query nodes ``node_idx`` (B, Tq) of a tree: :func:`tree_attention_inputs`."""
        return tree_attention_inputs(self.cfg, self.inv_freq, self.dtype, cache, node_idx, tree_mask, depths, decoding)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)

    def run_layers(self, h: torch.Tensor, start: int, end: int, cache: KVCache, a: AttentionInputs) -> torch.Tensor:
        fused = self.__dict__.get("fused_layers")  # set by prepare() on a CPU: all layers in one call, or None
        if fused is not None:
            out = fused(self, h, start, end, cache, a)
            if out is not None:
                return out
        for i in range(start, end):
            h = self.model.layers[i](h, i, cache, a)
        return h

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.norm(h)

    def logits(self, h_normed: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h_normed)

    SCREEN_ROWS = 32  # the argmax screen serves steps of up to this many rows (benchmarks/argmax_screen.py)

    def screened_argmax(self, h_normed: torch.Tensor) -> torch.Tensor | None:
        """The argmax ids (...) of :meth:`logits` of ``h_normed`` (..., H) through the Q8 screen
        (:mod:`propd.models.screen`), the same bit for bit; None where it does not serve: no screen built
        (:meth:`prepare_screen`), not the weight's dtype, more than ``SCREEN_ROWS`` rows, or the weights changed
        since."""
        cached = self.__dict__.get("_screen")
        rows = h_normed.numel() // h_normed.shape[-1]
        if (cached is None or not 1 <= rows <= self.SCREEN_ROWS or h_normed.dtype != cached[1].weight.dtype
                or cached[0] != weight_key(self.lm_head.weight)):
            return None
        x = h_normed.reshape(rows, h_normed.shape[-1])
        return cached[1].argmax(x, self.logits).view(h_normed.shape[:-1])

    def argmax(self, h_normed: torch.Tensor) -> torch.Tensor:
        """The argmax of :meth:`logits` (..., V) as ids (...): screened where it can be, else from the full logits."""
        ids = self.screened_argmax(h_normed)
        return cpu_kernel.argmax(self.logits(h_normed)) if ids is None else ids

    # a prefill group pads its rows to its longest prompt by at most this share of its real tokens
    PREFILL_WASTE = 0.125

    def rows_alone_in_prefill(self) -> bool:
        """Whether :meth:`prefill` runs each row alone: where decoding steps are row-invariant so that a last-bit
        difference cannot change tokens (``cpu_kernel.rounds_to_tokens`` on the CPU extension), a row's prefill must
        be its batch-1 prefill bit for bit, which padded groups (attention over another key length, products of
        another row count) are not. Float32 keeps the groups."""
        return (cpu_kernel.rounds_to_tokens(self.dtype, getattr(self.lm_head, "q8", False))
                and self.device.type == "cpu" and cpu_kernel.extension() is not None)

    def prefill(self, cache: KVCache, prompts: list[list[int]], keep_hidden: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run prompts of different lengths into an empty cache; return the normed last hidden state (B, H), and with
        ``keep_hidden`` also every position's (B, P, H), padded past each prompt's length.

        Rows run in groups of similar length (``prefill_groups``), each group into a cache of its own whose keys and
        values are then copied into the batch's rows, so the work is in proportion to the real tokens, not to batch x
        longest prompt (and attention to batch x longest^2); each row is a group of its own where
        :meth:`rows_alone_in_prefill`."""
        if max(cache.host_lengths, default=0) > 0:
            raise PropdError("prefill runs prompts into an empty cache")
        host_lens = [len(p) for p in prompts]
        groups = ([[r] for r in range(len(prompts))] if self.rows_alone_in_prefill()
                  else prefill_groups(host_lens, self.PREFILL_WASTE))
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
            cache.put_rows(idx, part, longest)
            last[idx] = final[torch.arange(len(rows), device=self.device), lens[idx] - 1]
            if full is not None:
                full[idx, :longest] = final
        cache.advance(lens, host_lens)
        return (last, full) if keep_hidden else last

    # a prefill runs its prompts in chunks of this many positions: a chunk attends only to the chunks before it and to
    # itself, so attention computes about P^2 / 2 + P * C / 2 scores where one P x P masked call computes P^2 (the
    # masked half too), and the mask is (C, S) instead of (P, P). A chunk of rows without padding needs no mask
    # (``AttentionInputs.causal``: the CPU extension's causal kernel, or SDPA's is_causal for a first chunk, skips the
    # masked part), so prompts up to this length are one causal call.
    # Above KernelLinear's skinny range (256 rows), the products stay plain matrix products.
    PREFILL_CHUNK = 1024

    def hidden_states(self, cache: KVCache, seqs: list[list[int]], capture: tuple[int, ...] = ()
                      ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run whole sequences (different lengths) into an empty cache and advance it.

        Returns the final normed hidden states (B, N, H) and, for each n in ``capture``, the hidden states after n
        layers (B, N, H); positions past a row's length are padding. The positions run in chunks of
        ``PREFILL_CHUNK``, each as a chain over the cache the chunks before it filled; a row whose prompt ended sends
        only padding, which writes to its scratch slot and attends to it alone (see :func:`tree_attention_inputs`).
        """
        if max(cache.host_lengths, default=0) > 0:
            raise PropdError("hidden_states runs sequences into an empty cache")
        dev = self.device
        n = len(seqs)
        longest = max(len(p) for p in seqs)
        tokens = torch.zeros(n, longest, dtype=torch.long, device=dev)
        host_lens = [len(p) for p in seqs]
        lens = torch.tensor(host_lens, dtype=torch.long, device=dev)
        for i, p in enumerate(seqs):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        layers = sorted(set(capture))
        finals, caps = [], {layer: [] for layer in layers}
        for start, T, real, node_idx in prefill_chunks(lens, longest, self.PREFILL_CHUNK):
            causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=dev))
            a = self.attention_inputs(cache, node_idx, causal, torch.arange(T, device=dev), decoding=False)
            if min(host_lens) >= start + T:  # no padding in the chunk or before it
                a = attrs.evolve(a, causal=True)
            h, at = self.embed(tokens[:, start:start + T]), 0
            for layer in layers:
                h = self.run_layers(h, at, layer, cache, a)
                caps[layer].append(h)
                at = layer
            finals.append(self.run_layers(h, at, self.num_layers, cache, a))
            cache.advance(real, [min(max(x - start, 0), T) for x in host_lens])
        cat = (lambda xs: xs[0] if len(xs) == 1 else torch.cat(xs, dim=1))
        return self.norm(cat(finals)), {layer: cat(xs) for layer, xs in caps.items()}
