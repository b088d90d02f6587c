"""Proposer ``eagle``: EAGLE-2 dynamic draft trees from an EAGLE feature drafter (:mod:`propd.models.eagle`).

EAGLE-2 (Li et al. 2024, "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees", arXiv 2406.16858):

* expand: the drafter's guess distribution at the root gives its ``top_k`` children; at each further depth the
  ``top_k`` newest nodes of highest path score (sum of log-probabilities along the path) are run through the drafter
  (one forward for all of them), and each offers its ``top_k`` children: ``depth`` levels in all;
* rerank: of every node offered, the N - 1 of highest path score form the tree (N: the sizer's budget, root
  included). A child's score never exceeds its parent's, so the chosen nodes form a tree.

Every row builds its own tree (a :class:`propd.tree.RowTrees` of N nodes per row). The drafter keeps a KV cache of
its own per row: it reads each row's prompt when the row begins (``propd_rows_begin``: pairs (f_t, x_{t+1}) for the
prompt), and before drafting it reads the pairs of the tokens committed since (their final hidden states come in
``ctx.accepted_hidden``). Steps with no draft are kept and read in one pass at the next draft, or between steps once
``catch_up`` of them wait: a sizer times its steps, and a draft after a long run of plain steps would otherwise
carry all of their reading and look slower than drafting is. Tree nodes sit in the cache's scratch past each row's
length and are overwritten by the next read, as in the base model's cache.

On a CPU with propd's extension a draft (the read, the expansion, the reranking) is one call of it
(``eagle_draft``: the same ATen ops and kernels in the same order, so the same draft bit for bit, tested); what goes
is the Python between a draft's hundred and fifty small tensor calls.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from propd.errors import PropdError
from propd.hookspecs import hookimpl
from propd.models import cpu_kernel
from propd.models.llama import LlamaModel, prefill_chunks, prefill_groups, tensor_version
from propd.tree import RowTrees
from propd.types import Draft

_SCORE_TIE = 1e-4  # per depth: a node scores strictly below its parent, so the top N are closed under ancestors


@attrs.frozen
class EagleConfig:
    """``top_k``: children per expanded node and nodes expanded per depth; ``depth``: levels drafted (also bounded by
    the sizer's budget depth). EAGLE-2 uses top_k 10, depth 5-6 and N = 60 for 7B models."""

    top_k: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    depth: int = attrs.field(default=6, validator=attrs.validators.ge(1))
    # read the committed tokens between steps once this many steps without a draft have waited (0: only at a draft)
    catch_up: int = attrs.field(default=8, validator=attrs.validators.ge(0))
    # the drafter's weights: "auto" is "q8" on a CPU with propd's extension (Q8_0 blocks and 8-bit activations: about
    # a quarter of float32's bytes streamed per draft step; the drafts, not the output, may differ), else the model's
    # dtype; or "q8", "float32", "bfloat16", "float16"
    dtype: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "q8", "float32", "bfloat16",
                                                                               "float16")))
    # on a CPU with propd's extension, each draft (read, expansion, reranking) in one call: the same draft with about
    # 150 fewer small calls from Python (False: the torch ops one by one)
    native: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))


class EagleProposer:
    def __init__(self, config: EagleConfig | None = None):
        self.cfg = config or EagleConfig()
        self.drafter = None
        self.cache = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (features (B, A, H), counts (B,)) not yet read
        self._absorbed = -1  # the last step whose accepted features went into _pending
        self._causal_masks: dict[tuple[int, torch.device], torch.Tensor] = {}  # (W, device) -> (W, W) tril
        self._native_memo: tuple | None = None  # (drafter, base, weights' stamps, {shape key: _native_args})

    @hookimpl
    def propd_setup(self, model):
        drafter = getattr(model, "drafter", None)
        if drafter is None:
            raise PropdError("this preset needs an EAGLE drafter: pass --heads DIR (an EAGLE checkpoint, or heads "
                             "with an eagle/ folder), or use --preset ar")
        on_cpu_kernel = drafter.device.type == "cpu" and cpu_kernel.extension() is not None
        if self.cfg.dtype == "q8" and not on_cpu_kernel:
            raise PropdError("eagle:dtype=q8 needs a CPU with propd's extension (docs/architecture.md); use "
                             "dtype=auto or a float type")
        if self.cfg.dtype == "auto":
            dtype = "q8" if on_cpu_kernel else drafter.dtype
        else:
            dtype = self.cfg.dtype if self.cfg.dtype == "q8" else getattr(torch, self.cfg.dtype)
        self.drafter = drafter.in_dtype(dtype)

    # ------------------------------------------------------------------------------------------ per-row state

    @hookimpl
    def propd_rows_begin(self, rows):
        """Read each prompt's pairs (f_t, x_{t+1}), t = 0 .. P-2; the pair of the last prompt token and the first
        generated token comes with step 0's accepted features."""
        self.cache = self._prompt_cache(rows)
        self._pending, self._absorbed = [], -1

    @hookimpl
    def propd_rows_join(self, rows):
        """Rows joining the batch: their prompts are read as at the batch's start into a cache of their own, whose
        rows are appended; the features pending for the other rows get empty rows for them."""
        part = self._prompt_cache(rows)
        self.cache.add_rows(part)
        k = len(rows.row_ids)
        self._pending = [(torch.cat([f, f.new_zeros(k, *f.shape[1:])]), torch.cat([c, c.new_zeros(k)]))
                         for f, c in self._pending]

    def _prompt_cache(self, rows):
        """A drafter cache holding ``rows``' prompt pairs. Rows are read in the base model's prefill groups
        (``prefill_groups``: rows of similar length, each group into a cache of its own copied into the batch's rows),
        so that the work follows the real pairs, not batch x longest prompt."""
        d = self.drafter
        B, P = rows.prompt_ids.shape
        cache = d.new_cache(B, P + 128)
        n = rows.prompt_lengths - 1  # (B,) pairs per row
        host_n = n.tolist()
        groups = prefill_groups([x + 1 for x in host_n], LlamaModel.PREFILL_WASTE)
        if len(groups) == 1:
            self._read_prompts(cache, rows.hidden, rows.prompt_ids, n, P - 1)
            return cache
        for g in groups:
            W = max(host_n[i] for i in g)
            if W < 1:
                continue
            idx = torch.tensor(g, device=n.device)
            part = d.new_cache(len(g), W + 2)  # + the padding's scratch slot
            self._read_prompts(part, rows.hidden[idx, :W], rows.prompt_ids[idx, :W + 1], n[idx], W)
            cache.put_rows(idx, part, W)
        cache.advance(n, host_n)
        return cache

    def _read_prompts(self, cache, hidden: torch.Tensor, prompt_ids: torch.Tensor, n: torch.Tensor, W: int) -> None:
        """Read ``n`` (B,) pairs per row from ``hidden`` (B, >= W, H) and ``prompt_ids`` (B, >= W + 1) into an empty
        ``cache``, in chunks as the base model's prefill (``LlamaModel.PREFILL_CHUNK``): each attends to itself and
        the chunks before it."""
        for start, T, real, node_idx in prefill_chunks(n, W, LlamaModel.PREFILL_CHUNK):
            self._read(hidden[:, start:start + T], prompt_ids[:, start + 1:start + 1 + T], node_idx, real, T, cache)

    @hookimpl
    def propd_rows_leave(self, keep, left):
        if self.cache is None:
            return
        if not keep:
            self.cache, self._pending = None, []
            return
        self.cache.select_rows(keep)
        idx = torch.tensor(keep, device=self.cache.lengths.device)
        self._pending = [(f[idx], c[idx]) for f, c in self._pending]

    def _absorb(self, ctx) -> None:
        """Keep the features of the tokens the previous step committed (once per step)."""
        if self._absorbed != ctx.step:
            self._absorbed = ctx.step
            self._pending.append((ctx.accepted_hidden, ctx.accepted_counts))

    @hookimpl
    def propd_after_step(self, ctx):
        self._absorb(ctx)  # a step with no draft: read its features at the next draft, or now if enough wait
        if self.cfg.catch_up and len(self._pending) >= self.cfg.catch_up and self.cache is not None:
            self._catch_up(ctx)

    def _read(self, features: torch.Tensor, next_tokens: torch.Tensor, node_idx: torch.Tensor, n: torch.Tensor,
              W: int, cache=None, host_n: list[int] | None = None) -> torch.Tensor:
        """Run pairs into the drafter's cache (or ``cache``) after each row's length: features (B, W, H), next tokens
        (B, W), ``node_idx`` (B, W) (W = padding), ``n`` (B,) real pairs. Returns the outputs g (B, W, H)."""
        d, cache = self.drafter, self.cache if cache is None else cache
        cache.reserve(max(cache.host_lengths) + W + 2)
        ar = torch.arange(W, device=node_idx.device)
        a = d.attention_inputs(cache, node_idx, self._causal(W, ar.device), ar)
        g = d(features, next_tokens, cache, a)
        cache.advance(n, n.tolist() if host_n is None else host_n)
        return g

    def _causal(self, W: int, device: torch.device) -> torch.Tensor:
        """The (W, W) lower-triangular mask of a chain of W reads, kept per (W, device)."""
        if (W, device) not in self._causal_masks:
            self._causal_masks[W, device] = torch.ones(W, W, dtype=torch.bool, device=device).tril()
        return self._causal_masks[W, device]

    def _catch_up(self, ctx) -> torch.Tensor:
        """Read every committed token the drafter has not seen; the drafter's prediction (B, H) of the root's
        feature, from which the root's children are guessed."""
        feats, n, n_host, W = self._take_pending(ctx)
        cache = self.cache
        ar = torch.arange(W, device=n.device)
        node_idx = torch.where(ar[None, :] < n[:, None], ar[None, :], torch.full_like(ar, W)[None, :])
        # the token after each read position t is history[t + 1], t = cache length .. ctx length - 1
        tok_pos = (cache.lengths[:, None] + 1 + ar[None, :]).clamp(max=ctx.history.shape[1] - 1)
        next_tokens = ctx.history.gather(1, tok_pos)
        g = self._read(feats, next_tokens, node_idx, n, W, host_n=n_host)  # (B, W, H)
        return g.gather(1, (n - 1).clamp(min=0)[:, None, None].expand(-1, 1, g.shape[-1]))[:, 0]

    def _take_pending(self, ctx) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
        """The features of the committed tokens not read yet, compacted to the left of each row (B, W, H), how many
        each row has (B,) and on the host, and W; the pending list emptied."""
        self._absorb(ctx)
        n_host = [a - b for a, b in zip(ctx.host_lengths, self.cache.host_lengths)]
        W = max(n_host)
        if len(self._pending) == 1:  # one step's features (drafting every step): already each row's first ones
            feats = self._pending[0][0][:, :W]
        else:
            feats = torch.cat([f for f, _ in self._pending], dim=1)  # (B, sum A, H)
            valid = torch.cat([torch.arange(f.shape[1], device=f.device)[None, :] < c[:, None]
                               for f, c in self._pending], dim=1)  # (B, sum A)
            # compact each row's real features to the left, in order
            order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :W]
            feats = feats.gather(1, order[..., None].expand(-1, -1, feats.shape[-1]))  # (B, W, H)
        self._pending = []
        return feats, ctx.lengths - self.cache.lengths, n_host, W

    # ------------------------------------------------------------------------------------------ drafting

    def _guesses(self, g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best guesses after predicted features g (.., H): token ids (.., k) and log-probabilities (.., k)."""
        logits, ids = self.drafter.draft_logits(g)
        top = torch.log_softmax(logits.float(), dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
        tokens = top.indices if ids is None else ids[top.indices]
        return tokens, top.values

    @hookimpl
    def propd_propose(self, ctx, tree):
        cfg, cache = self.cfg, self.cache
        B, dev = ctx.batch_size, ctx.device
        budget = tree.num_nodes - 1  # guessed nodes per row
        # the N - 1 chosen nodes are closed under ancestors, so none lies deeper than N - 1 and each level's chosen
        # nodes are among its N - 1 best: expanding more levels, or more than N - 1 nodes per level, is wasted work
        depth = min(cfg.depth, tree.max_depth, budget)
        k = min(cfg.top_k, budget, self.drafter.draft_size)  # children per expanded node
        native = self._native_args(B, k, max(a - b for a, b in zip(ctx.host_lengths, cache.host_lengths))) \
            if depth >= 1 and budget >= 1 else None
        if native is not None:  # the same steps in one extension call
            feats, n, n_host, W = self._take_pending(ctx)
            before = max(cache.host_lengths)
            after = max(a + b for a, b in zip(cache.host_lengths, n_host))
            cache.reserve(max(before + W, after + (depth - 1) * k) + 2)
            cache_k, cache_v = cache.layer(0)
            tokens, parents, probs, conf = cpu_kernel.extension().eagle_draft(
                feats, n, ctx.history, self._causal(W, dev), ctx.roots, cache.lengths, before, after,
                cache_k, cache_v, *native, cfg.top_k, depth, budget)
            cache.advance(n, n_host)
        else:
            g0 = self._catch_up(ctx)  # (B, H)
            if depth < 1 or budget < 1:
                return Draft(tokens=ctx.roots[:, None], tree=RowTrees.from_parents(
                    torch.full((B, 1), -1, dtype=torch.long, device=dev), max_depth=0))
            cache.reserve(max(cache.host_lengths) + (depth - 1) * k + 2)  # the frontiers' slots past each row
            tokens, parents, probs, conf = self._expand_torch(g0, ctx.roots, depth, budget)
        return Draft(tokens=tokens, tree=RowTrees.from_parents(parents, max_depth=depth), probs=probs,
                     confidence=conf)

    def _expand_torch(self, g0: torch.Tensor, roots: torch.Tensor, depth: int, budget: int
                      ) -> tuple[torch.Tensor, ...]:
        """EAGLE-2's expansion (``depth`` levels from the roots' children) and reranking (the ``budget`` best nodes)
        after predicted features g0 (B, H): tokens and parents (B, N) int64, path probabilities and confidences
        (B, N) float32, N = 1 + min(budget, pool). The cache must hold (depth - 1) * k + 2 free slots per row."""
        d, cfg = self.drafter, self.cfg
        B, dev = g0.shape[0], g0.device
        tok, lp = self._guesses(g0, min(cfg.top_k, budget))  # (B, k) the root's children
        k = tok.shape[1]
        pool_tok, pool_score, pool_parent, pool_lp = [tok], [lp - _SCORE_TIE], [tok.new_full((B, k), -1)], [lp]
        front_tok, front_score, front_pool = tok, pool_score[0], torch.arange(k, device=dev).expand(B, k)
        front_in = g0[:, None].expand(B, k, g0.shape[-1])  # each frontier node's input feature: its parent's g
        front_slot = None  # (B, k) the frontier's parents' slots in the drafter's tree scratch
        cache = self.cache
        n_fed = (depth - 1) * k
        fed_mask = torch.zeros(B, max(n_fed, 1), max(n_fed, 1), dtype=torch.bool, device=dev)
        fed_depth = torch.arange(max(n_fed, 1), device=dev) // k  # (Nf,) level - 1: position = length + level - 1
        offset = k
        for level in range(1, depth):
            slots = torch.arange((level - 1) * k, level * k, device=dev)  # (k,)
            if front_slot is not None:
                fed_mask[:, slots] = fed_mask.gather(1, front_slot[..., None].expand(-1, -1, fed_mask.shape[2]))
            fed_mask[:, slots, slots] = True
            a = d.attention_inputs(cache, slots.expand(B, k), fed_mask, fed_depth.expand(B, -1))
            g = d(front_in, front_tok, cache, a)  # (B, k, H)
            ctok, clp = self._guesses(g, k)  # (B, k, k)
            score = (front_score[..., None] + clp - _SCORE_TIE).flatten(1)  # (B, k*k)
            pool_tok.append(ctok.flatten(1))
            pool_score.append(score)
            pool_parent.append(front_pool[..., None].expand(B, k, k).flatten(1))
            pool_lp.append(clp.flatten(1))
            best = score.topk(k, dim=1).indices  # (B, k) the next frontier, by path score
            parent_of = best // k  # which frontier node each came from
            front_tok = ctok.flatten(1).gather(1, best)
            front_score = score.gather(1, best)
            front_pool = offset + best
            front_in = g.gather(1, parent_of[..., None].expand(-1, -1, g.shape[-1]))
            front_slot = slots[parent_of]
            offset += k * k
        scores = torch.cat(pool_score, dim=1)  # (B, pool)
        n = min(budget, scores.shape[1])
        chosen = scores.topk(n, dim=1).indices.sort(dim=1).values  # (B, n) pool order: parents before children
        pool_parent_t = torch.cat(pool_parent, dim=1)
        where = torch.zeros(B, scores.shape[1], dtype=torch.long, device=dev)  # pool index -> tree node
        where.scatter_(1, chosen, torch.arange(1, n + 1, device=dev).expand(B, n))
        parent_pool = pool_parent_t.gather(1, chosen)
        parents = torch.where(parent_pool < 0, 0, where.gather(1, parent_pool.clamp(min=0)))
        parents = torch.cat([parents.new_full((B, 1), -1), parents], dim=1)
        tokens = torch.cat([roots[:, None], torch.cat(pool_tok, dim=1).gather(1, chosen)], dim=1)
        probs = torch.cat([torch.ones(B, 1, device=dev), torch.cat(pool_lp, dim=1).gather(1, chosen).exp()], dim=1)
        conf = torch.cat([torch.ones(B, 1, device=dev), (scores.gather(1, chosen)).exp()], dim=1)
        return tokens, parents, probs, conf

    def _native_args(self, B: int, k: int, W: int) -> tuple | None:
        """:meth:`_find_native_args`, kept between drafts of the same shape while every tensor of the modules it read
        (the drafter's, the base model's embedding and ``lm_head``) is the same one, unchanged in place: its checks
        walk a few dozen module attributes, a noticeable share of a draft."""
        d = self.drafter
        memo = self._native_memo
        if memo is None or memo[0] is not d or memo[1] is not d.base or not all(
                store.get(name) is t and tensor_version(t) == v for store, name, t, v in memo[2]):
            mods = [*d.modules(), d.base.model.embed_tokens, d.base.lm_head]
            stamps = [(store, name, t, tensor_version(t)) for m in mods for store in (m._parameters, m._buffers)
                      for name, t in store.items() if t is not None]
            memo = self._native_memo = (d, d.base, stamps, {})
        key = (B, k, W, torch.is_grad_enabled())
        if key not in memo[3]:
            if len(memo[3]) >= 256:  # shapes seen long ago
                memo[3].clear()
            memo[3][key] = self._find_native_args(B, k, W)
        return memo[3][key]

    def _find_native_args(self, B: int, k: int, W: int) -> tuple | None:
        """The drafter's arguments to the extension's ``eagle_draft`` (after its cache's buffers) for a draft of B
        rows that reads W pairs per row and expands k nodes per level, where each part of :meth:`_catch_up` and
        :meth:`_expand_torch` would take the kernels' path anyway (a CPU drafter, packed products within their row
        bounds, its layer's fused call, the base model's plain embedding and ``lm_head``); else None. The draft is
        the same either way (tested)."""
        d = self.drafter
        if not self.cfg.native or d.device.type != "cpu" or torch.is_grad_enabled() or cpu_kernel.extension() is None:
            return None
        from propd.models.cpu_modules import KernelDecoderLayer, _invariant

        emb, layer = d.base.model.embed_tokens, d.layers[0]
        if (type(emb) is not nn.Embedding or emb.max_norm is not None or type(d.base).embed is not LlamaModel.embed
                or type(layer) is not KernelDecoderLayer):
            return None
        H, T = d.cfg.hidden_size, max(k, W)
        x = torch.empty(B, T, H, dtype=d.dtype)
        fc = _packed_args(d.fc, x.new_empty(B, T, 2 * H), B * T)
        if d.draft_ids is None:  # guesses over the whole vocabulary: the base model's lm_head (draft_logits)
            if type(d.base).logits is not LlamaModel.logits:
                return None
            like = x.new_empty(0, dtype=d.base.dtype)
            proj = _packed_args(d.base.lm_head, like.new_empty(B, k, H), B * k)
        else:
            like = x.new_empty(0)
            proj = _packed_args(d._projection(), x, B * k)
        cache_k = self.cache.layer(0)[0]
        # the read's and the expansion's calls of the layer (W and k queries) both fused
        fused = [layer._fused_weights(x[:, :t], cache_k, True) for t in {W, k}] if W >= 1 else [None]
        if fc is None or proj is None or proj[1] is not None or any(f is None for f in fused):
            return None
        weights, outs = fused[-1]
        ids = _EMPTY_IDS if d.draft_ids is None else d.draft_ids
        return (emb.weight, fc[0], _EMPTY if fc[1] is None else fc[1], d.fc.out_features, proj[0], d.draft_size, like,
                ids, weights, outs, layer.input_layernorm.eps, layer.self_attn.cfg.head_dim ** -0.5,
                _invariant(layer.self_attn, x.dtype), d.inv_freq, d.cfg.rope_attention_scaling)


_EMPTY, _EMPTY_IDS = torch.empty(0), torch.empty(0, dtype=torch.long)


def _packed_args(mod: nn.Module, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(packed weight, bias or None) of a linear module whose ``forward(x)`` of ``rows`` rows is the extension's
    ``packed_linear`` (plus its bias), else None."""
    from propd.models.cpu_modules import KernelLinear
    from propd.models.quant import QuantLinear

    if isinstance(mod, QuantLinear):
        if mod.q8:  # 8-bit activations at every row count, from float32 inputs
            return (mod.packed, None) if x.dtype == torch.float32 else None
        packed = mod._kernel_weight(x, rows)
        return None if packed is None else (packed, None)
    if type(mod) is KernelLinear:
        packed = mod._kernel_weight(x, rows)
        return None if packed is None else (packed, mod.bias)
    return None


@hookimpl
def propd_register_components(register):
    register("proposer", "eagle", EagleProposer, EagleConfig,
             "EAGLE-2 dynamic per-row trees from an EAGLE feature drafter (top_k=K children, depth=D levels)")
