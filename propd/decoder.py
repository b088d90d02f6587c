"""The decoding loop: size -> propose -> layers 0..n-1 -> prune -> layers n..L-1 -> verify -> commit -> learn.

One loop serves every method. A 1-node tree is an autoregressive step; a chain with top-1 guesses is blockwise
parallel decoding (Stern et al. 2018); a tree of head guesses is Medusa (Cai et al. 2023); pruning after an early
layer and choosing the tree size online is ProPD (Zhong et al. 2024, arXiv 2402.13485). Which of these runs is
decided only by which components are registered in this decoder's plugin manager.

Batches: B prompts of different lengths share every forward pass; each row accepts its own number of tokens per
step and stops on its own EOS or token budget; finished rows leave the batch (their cache rows are dropped), and
prompts waiting for a place take theirs (continuous batching: the newcomers' prefill runs on its own, then they
decode beside the others).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Iterable, Sequence

import attrs
import torch

from propd.errors import PropdError
from propd.models.loading import LoadedModel
from propd.plugins import Registry, step_manager
from propd.sampling import SamplingParams, draw, probabilities, row_generators
from propd.threads import ThreadTuner
from propd.presets import AUTO, Spec, auto_preset, get_preset, parse_component
from propd.tree import DraftTree, RowTrees, positions_of, survivors
from propd.types import Acceptance, Draft, GenerationResult, LiveNodes, RowsBegin, StepContext, StepStats

ComponentArg = str | Spec | Any  # a name, (name, options), or a ready component object


class Decoder:
    """Decode prompts with a combination of strategy components.

    ``preset`` names a combination (``propd presets``); the default ``auto`` picks the fastest lossless one the
    model supports on its device (:func:`propd.presets.auto_preset`: ``propd`` on a GPU with heads and early heads,
    ``ar`` without heads and on a CPU).
    ``sizer``, ``proposer``, ``pruners`` and ``verifier`` override its roles by name, ``"name:key=value,..."`` (as on the command line), ``(name, options)``, or a
    component object. ``plugins`` adds plugin objects (modules or instances implementing
    ``propd_register_components``) besides the installed entry points.
    ``static_shapes``: every step runs at a fixed node width, the draft padded to the next of ``STATIC_WIDTHS`` with
    absent nodes and pruning's survivors compacted to that width on the device, with no host sync for their count
    (what CUDA graph capture needs; the output is the same, tested). ``draft_vocab`` is how many of the most frequent
    tokens the Medusa heads guess from: None (default) all of their
    ``draft_vocab.json`` if they have one, else the whole vocabulary; 0 the whole vocabulary (see
    :mod:`propd.models.heads`). The output never depends on it, only how often guesses are right and what they cost.
    ``threads``: on a CPU, ``"auto"`` (default) lets decoding steps run at the thread count their measured time
    favours, up to the process's (:class:`propd.threads.ThreadTuner`: on a shared machine fewer threads can be
    faster); a number fixes the count of steps and prefill; None leaves torch's setting alone. Under ``"auto"`` a
    prefill runs at the process's count unless the steps moved below it. The output never depends on it.
    ``observers``: objects in no role that implement lifecycle hooks only (``propd_setup``, ``propd_rows_begin``,
    ``propd_rows_join``, ``propd_rows_leave``, ``propd_after_step``), to watch the decoding without changing it, e.g.
    to record hidden states (:class:`propd.training.hidden.HiddenRecorder`).
    ``continuous``: with more prompts than ``batch_size``, a waiting prompt joins the batch as soon as a row finishes
    (default), so the batch stays full; it needs every component with per-row state to take rows joining
    (``propd_rows_join``), else, or with False, prompts go in fixed batches of ``batch_size``. The output is the same.
    """

    def __init__(self, model: LoadedModel, preset: str | None = "auto", *, sizer: ComponentArg | None = None,
                 proposer: ComponentArg | None = None, pruners: Sequence[ComponentArg] | None = None,
                 verifier: ComponentArg | None = None, plugins: Iterable[Any] = (), entry_points: bool = True,
                 draft_vocab: int | None = None, static_shapes: bool = False, threads: str | int | None = "auto",
                 observers: Iterable[Any] = (), continuous: bool = True):
        self.model = model
        self.static_shapes = static_shapes
        self.threads = self._thread_tuner(threads, model)
        if draft_vocab is not None:
            if model.heads is None:
                raise PropdError(f"draft_vocab={draft_vocab} is for Medusa heads, but none are loaded")
            model.heads.draft_size(draft_vocab)  # refuses sizes the heads cannot serve
        self.draft_vocab = draft_vocab
        model.prepare(draft_vocab)  # packing etc. now, not inside the first (timed) steps
        self.registry = Registry(extra_plugins=plugins, entry_points=entry_points)
        if preset == AUTO:
            preset = auto_preset(model)
        self.preset = preset  # the preset's name (``auto`` resolved), or None for explicit components only
        p = get_preset(preset, self.registry) if preset is not None else None
        choice = {
            "sizer": sizer if sizer is not None else (p.sizer if p else None),
            "proposer": proposer if proposer is not None else (p.proposer if p else None),
            "verifier": verifier if verifier is not None else (p.verifier if p else ("greedy", {})),
        }
        self._labels: dict[int, str] = {}  # id(component) -> "proposer 'medusa'", for errors naming the culprit
        chosen = [(role, self._build(role, arg)) for role, arg in choice.items() if arg is not None]
        for arg in (pruners if pruners is not None else (p.pruners if p else ())):
            chosen.append(("pruner", self._build("pruner", arg)))
        self.components = chosen
        self.observers = list(observers)  # checked by step_manager
        self._role_label = {role: self._labels[id(obj)] for role, obj in chosen}  # of the manager running now
        self._greedy_role_label = self._role_label
        self.pm = step_manager(chosen, self.observers)
        self.continuous = continuous and all(rows_can_join(obj) for obj in [o for _, o in chosen] + self.observers)
        self.has_proposer = any(role == "proposer" for role, _ in chosen)
        self.pm.hook.propd_setup(model=model)
        # greedy steps of a verifier that reads only each node's argmax take it through the lm_head's argmax screen
        verifiers = [impl.plugin for impl in self.pm.hook.propd_verify.get_hookimpls()]
        self._argmax_only = bool(verifiers) and all(getattr(v, "argmax_only", False) for v in verifiers)
        if self._argmax_only and hasattr(model.model, "prepare_screen"):
            model.model.prepare_screen()
        L = model.config.num_layers
        declared = {id(impl.plugin): impl.function() for impl in self.pm.hook.propd_prune_layer.get_hookimpls()}
        self._pruners_at: dict[int, list] = {}
        for impl in self.pm.hook.propd_prune.get_hookimpls():
            if id(impl.plugin) not in declared:
                label = self._labels.get(id(impl.plugin), type(impl.plugin).__name__)
                raise PropdError(f"{label} implements propd_prune but declares no layer (propd_prune_layer)")
            self._pruners_at.setdefault(declared[id(impl.plugin)], []).append(impl)
        bad = sorted(n for n in self._pruners_at if not (isinstance(n, int) and 1 <= n < L))
        if bad:
            raise PropdError(f"pruning layer(s) {bad} out of range: the model has {L} layers (use 1..{L - 1})")
        self.prune_layers = sorted(self._pruners_at)
        self._single_trees: dict[str, DraftTree] = {}
        self._sampling_pm = None

    def _build(self, role: str, arg: ComponentArg) -> Any:
        if isinstance(arg, str) or (isinstance(arg, tuple) and len(arg) == 2 and isinstance(arg[0], str)):
            name, options = parse_component(arg) if isinstance(arg, str) else (arg[0], dict(arg[1] or {}))
            comp = self.registry.get(role, name)
            if (self.draft_vocab is not None and comp.config_cls is not None and "draft_vocab" not in options
                    and "draft_vocab" in attrs.fields_dict(comp.config_cls)):
                options["draft_vocab"] = self.draft_vocab  # the Decoder's draft_vocab= reaches Medusa proposers
            obj = comp.build(options)
            if callable(getattr(obj, "bind_registry", None)):  # components made of components (composite)
                obj.bind_registry(self.registry)
        else:  # a component object
            name, obj = type(arg).__name__, arg
        self._labels[id(obj)] = f"{role} {name!r}"
        return obj

    # ------------------------------------------------------------------------------------------ prompts

    def encode(self, prompts: Sequence[str | Sequence[dict]], chat: bool = True,
               raw_special: bool = False) -> list[list[int]]:
        """Token ids for each prompt: a string (one user message), or a conversation as a list of
        ``{"role", "content"}`` messages; through the tokenizer's chat template when it has one and ``chat``.

        Text inside a message never becomes special tokens (``<|im_end|>`` typed by a user stays text:
        :mod:`propd.chat`) unless ``raw_special``.
        """
        from propd.chat import encode_chat, encode_plain

        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise PropdError("no prompts given")
        tok = self.model.tokenizer
        use_chat = chat and getattr(tok, "chat_template", None)
        out = []
        for i, prompt in enumerate(prompts):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            if not isinstance(messages, (list, tuple)) or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
                hint = " (token ids go to Decoder.generate_ids)" if isinstance(prompt, int) else ""
                raise PropdError(f"prompt {i} is not text but {type(prompt).__name__} {prompt!r:.40}: give a string "
                                 f"or a list of {{'role', 'content'}} messages{hint}")
            if not messages or not any(m["content"].strip() for m in messages):
                raise PropdError(f"prompt {i} is empty")
            if use_chat:
                ids = encode_chat(tok, messages, raw_special=raw_special)
            elif len(messages) == 1:
                ids = encode_plain(tok, messages[0]["content"], raw_special=raw_special)
            else:
                raise PropdError(f"prompt {i} is a conversation, which needs a tokenizer with a chat template")
            out.append(list(ids))
        return out

    def generate(self, prompts: Sequence[str | Sequence[dict]] | str, max_new_tokens: int = 128,
                 batch_size: int | None = None, chat: bool = True, progress: bool = False,
                 raw_special: bool = False, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int = 0, on_text: Callable[[int, str], Any] | None = None,
                 stop: str | Sequence[str] = ()) -> GenerationResult:
        """Generate a continuation for each prompt; prompts as in :meth:`encode`.

        ``temperature`` 0 (the default) is greedy decoding. Above 0, tokens are sampled from the base model's
        distribution processed by temperature, ``top_k`` (0: all) and ``top_p`` (1: all), exactly as AR sampling
        would (:mod:`propd.strategies.sampling`); prompt i draws from a generator seeded by (``seed``, i).
        ``on_text(i, piece)``, if given, streams: it is called with each new piece of prompt i's text as its tokens
        are accepted (several tokens per step where a tree pays), and the pieces of prompt i add up to ``texts[i]``.
        ``stop``: a string or strings that end a prompt's generation where its text first contains one, as OpenAI's
        and vLLM's ``stop``: its text ends before it, its token ids with the token that completed it
        (:class:`StopStrings`); every method stops at the same token, since all generate the same tokens.
        """
        stops = stop_strings(stop)
        ids = self.encode(prompts, chat=chat, raw_special=raw_special)
        tok = self.model.tokenizer
        stopper = StopStrings(tok, stops, on_text) if stops else None
        deltas = TextDeltas(tok, on_text) if on_text is not None and stopper is None else None
        res = self.generate_ids(ids, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, on_tokens=deltas,
                                stop_at=stopper)
        texts = [tok.decode(t, skip_special_tokens=True) for t in res.token_ids]
        for i, text in enumerate(texts):
            if stopper is not None:
                texts[i] = stopper.finish(i, text)
            elif deltas is not None:
                deltas.finish(i, text)
        return attrs.evolve(res, texts=texts)

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 128,
                     batch_size: int | None = None, progress: bool = False, temperature: float = 0.0,
                     top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                     on_tokens: Callable[[int, list[int]], Any] | None = None,
                     stop_at: Callable[[int, list[int]], int | None] | None = None) -> GenerationResult:
        """:meth:`generate` for prompts given as token ids. ``on_tokens(i, ids)``, if given, is called after each
        step (and after the prefill) with the token ids prompt i gained, in order: they add up to ``token_ids[i]``.
        ``stop_at(i, ids)``, if given, is called before it with all of prompt i's new token ids so far; a number n
        ends the prompt there, with its first n new tokens (n at least the count before the step). Neither call's
        time is part of the steps' times."""
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        prompt_ids = [list(p) for p in prompt_ids]
        self._check(prompt_ids, max_new_tokens)
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                       or batch_size < 1):
            raise PropdError(f"batch_size must be a positive whole number or None (all prompts at once), "
                             f"got {batch_size!r}")
        bs = batch_size or len(prompt_ids)
        n = len(prompt_ids)
        gens = [] if params.greedy else row_generators(params.seed, range(n), self.model.model.device)
        pm = self.pm if params.greedy else self._sampling_manager()
        self._role_label = self._greedy_role_label if params.greedy else self._sampling_role_label  # names in errors
        run = _Run(prompt_ids=prompt_ids, max_new=max_new_tokens, params=params, gens=gens,
                   tokens=[[] for _ in range(n)], accepts=[[] for _ in range(n)], row_time=[0.0] * n, stats=[],
                   waiting=deque(range(n)), joins=self.continuous and n > bs, on_tokens=on_tokens,
                   stop_at=stop_at)
        t0 = time.perf_counter()
        if progress and n > bs:
            from tqdm import tqdm

            run.bar = tqdm(total=n, desc="prompts", unit="prompt")
        if self.threads is not None:
            self.threads.start()
        try:
            while run.waiting:
                self._decode_batch(pm, run, [run.waiting.popleft() for _ in range(min(bs, len(run.waiting)))], bs)
        finally:
            if self.threads is not None:
                self.threads.restore()
            if run.bar is not None:
                run.bar.close()
        tokens, accepts, row_time, stats = run.tokens, run.accepts, run.row_time, run.stats
        return GenerationResult(texts=[""] * n, token_ids=tokens, steps=[len(a) for a in accepts],
                                wall_time_s=time.perf_counter() - t0, stats=stats, row_wall_time_s=row_time,
                                accept_lengths=accepts)

    def _sampling_manager(self):
        """The plugin manager for sampled generation: the ``greedy`` verifier gives way to ``sampling``, which keeps
        the distribution exactly; any other verifier stays and reads ``ctx.sampling`` itself."""
        if self._sampling_pm is None:
            from propd.strategies.greedy import GreedyVerifier
            from propd.strategies.sampling import SamplingVerifier

            chosen = []
            for role, obj in self.components:
                if role == "verifier" and type(obj) is GreedyVerifier:
                    obj = SamplingVerifier()
                    self._labels[id(obj)] = "verifier 'sampling'"
                chosen.append((role, obj))
            self._sampling_pm = step_manager(chosen, self.observers)
            self._sampling_role_label = {role: self._labels[id(obj)] for role, obj in chosen}
        return self._sampling_pm

    def _check(self, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
        if not prompt_ids:
            raise PropdError("no prompts given")
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise PropdError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        cfg = self.model.config
        for i, p in enumerate(prompt_ids):
            if not p:
                raise PropdError(f"prompt {i} is empty")
            if len(p) + max_new_tokens > cfg.max_position_embeddings:
                raise PropdError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                                 f"model's context of {cfg.max_position_embeddings} tokens")
            if min(p) < 0 or max(p) >= cfg.vocab_size:
                raise PropdError(f"prompt {i} has token ids outside the vocabulary (0..{cfg.vocab_size - 1})")

    # ------------------------------------------------------------------------------------------ checks

    def _fault(self, role: str, what: str) -> PropdError:
        return PropdError(f"{self._role_label.get(role, role)} returned {what}")

    def _as_draft(self, out: Any, budget: DraftTree, roots: torch.Tensor) -> Draft:
        """The proposer's result, checked (:func:`check_draft`), naming the proposer at fault."""
        return check_draft(out, budget, roots, self.model.config.vocab_size,
                           self._role_label.get("proposer", "proposer"))

    def _checked_keep(self, impl: Any, k: Any, shape: tuple[int, int]) -> torch.Tensor:
        """A pruner's keep-mask must be (B, T) bool."""
        if isinstance(k, torch.Tensor) and k.dtype == torch.bool and tuple(k.shape) == shape:
            return k
        label = self._labels.get(id(impl.plugin), type(impl.plugin).__name__)
        got = f"{tuple(k.shape)} {k.dtype}" if isinstance(k, torch.Tensor) else _kind(k)
        raise PropdError(f"pruner {label.removeprefix('pruner ')} returned {got} from propd_prune; "
                         f"expected a {shape} torch.bool keep-mask or None")

    def _acceptance_ok(self, acc: Any, rows: RowTrees, nodes: LiveNodes) -> torch.Tensor:
        """Per row: the best node is live, accept_len is its depth, the bonus is in the vocabulary (B,) int64."""
        B, T, V = nodes.node_idx.shape[0], rows.num_nodes, self.model.config.vocab_size
        if not isinstance(acc, Acceptance):
            raise self._fault("verifier", f"{_kind(acc)} from propd_verify, not an Acceptance")
        for field in ("best", "accept_len", "bonus"):
            t = getattr(acc, field)
            if not isinstance(t, torch.Tensor) or t.shape != (B,) or t.dtype != torch.long:
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else _kind(t)
                raise self._fault("verifier", f"Acceptance.{field} of {got}; expected ({B},) torch.int64")
        best = acc.best.clamp(0, T - 1)
        alive = nodes.alive().gather(1, best[:, None])[:, 0]
        ok = ((acc.best >= 0) & (acc.best < T) & alive & (acc.accept_len == rows.depth_at(best))
              & (acc.bonus >= 0) & (acc.bonus < V))
        return ok.long()

    # ------------------------------------------------------------------------------------------ the loop

    def _start_rows(self, run: "_Run", rows: list[int], keep_hidden: bool) -> tuple:
        """Prefill prompts ``rows`` into a cache of their own and choose each one's first token (a root).

        Returns the cache, the last prompt position's hidden state (k, H), the roots (k,), the token histories
        (k, capacity + 1: the prompt, then the root at index ``lengths[b]``) and their :class:`RowsBegin` (with every
        prompt position's hidden state (k, P, H) if ``keep_hidden``)."""
        m, dev = self.model.model, self.model.model.device
        prompts = [run.prompt_ids[r] for r in rows]
        longest = max(len(p) for p in prompts)
        if self.threads is not None:
            self.threads.for_prefill()  # the process's thread count, unless the steps found fewer faster
        now = time.perf_counter()
        for r in rows:
            run.started[r] = now
        cache = m.new_cache(len(prompts), longest + run.max_new + 66)
        if keep_hidden:
            last_hidden, prompt_hidden = m.prefill(cache, prompts, keep_hidden=True)  # (k, H), (k, P, H)
        else:
            last_hidden, prompt_hidden = m.prefill(cache, prompts), None  # (k, H)
        if run.params.greedy:
            roots = m.argmax(last_hidden)  # (k,)
        else:
            p0 = probabilities(m.logits(last_hidden), run.params)
            roots = torch.tensor([draw(p0[b], run.gens[r]) for b, r in enumerate(rows)], dtype=torch.long, device=dev)
        history = torch.zeros(len(prompts), cache.capacity + 1, dtype=torch.long)
        for b, p in enumerate(prompts):
            history[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        history = history.to(dev)
        history.scatter_(1, cache.lengths[:, None], roots[:, None])
        for r, t in zip(rows, roots.tolist()):
            run.tokens[r].append(t)
            run.accepts[r].append(1)
            run.gained(r, 0)
        info = RowsBegin(row_ids=tuple(rows), prompt_ids=history[:, :longest], prompt_lengths=cache.lengths.clone(),
                         hidden=prompt_hidden, roots=roots)
        return cache, last_hidden, roots, history, info

    @torch.inference_mode()
    def _decode_batch(self, pm, run: "_Run", rows: list[int], bs: int) -> None:
        """Decode prompts ``rows`` as one batch until every row has finished; with ``run.joins``, waiting prompts
        take the places of rows that finish, up to ``bs`` rows."""
        model, m = self.model, self.model.model
        eos = self.model.eos_token_ids
        dev = m.device
        out, max_new, params = run.tokens, run.max_new, run.params
        tuner = self.threads
        begin = bool(pm.hook.propd_rows_begin.get_hookimpls())
        join = bool(pm.hook.propd_rows_join.get_hookimpls())
        cache, last_hidden, roots, history, info = self._start_rows(run, rows, keep_hidden=begin)
        if begin:
            pm.hook.propd_rows_begin(rows=info)
        acc_hidden, acc_counts = last_hidden[:, None], torch.ones(len(rows), dtype=torch.long, device=dev)
        gens = [run.gens[r] for r in rows] if run.gens else []
        live = list(rows)
        step = 0
        while True:
            done = {b for b, r in enumerate(live)
                    if len(out[r]) >= max_new or out[r][-1] in eos or r in run.stopped}
            if done:
                now = time.perf_counter()
                for b in done:
                    run.row_time[live[b]] = now - run.started[live[b]]
                if run.bar is not None:
                    run.bar.update(len(done))
                keep = fill_holes(len(live), done)
                pm.hook.propd_rows_leave(keep=keep, left=tuple(live[b] for b in sorted(done)))
                if not keep:
                    return
                cache.select_rows(keep)
                idx = torch.tensor(keep, device=dev)
                roots, last_hidden, history = roots[idx], last_hidden[idx], history[idx]
                gens = [gens[b] for b in keep] if gens else gens
                acc_hidden, acc_counts = acc_hidden[idx], acc_counts[idx]
                live = [live[b] for b in keep]
                if run.joins and run.waiting:  # waiting prompts take the free places, after the rows that stay
                    new = [run.waiting.popleft() for _ in range(min(bs - len(live), len(run.waiting)))]
                    part, h_new, r_new, hist_new, info = self._start_rows(run, new, keep_hidden=join)
                    cache.add_rows(part)
                    width = max(history.shape[1], hist_new.shape[1])
                    history = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1]))
                                         for x in (history, hist_new)])
                    roots, last_hidden = torch.cat([roots, r_new]), torch.cat([last_hidden, h_new])
                    acc_hidden = torch.cat([acc_hidden, h_new[:, None].expand(-1, acc_hidden.shape[1], -1)])
                    acc_counts = torch.cat([acc_counts, torch.ones_like(r_new)])
                    gens = gens + [run.gens[r] for r in new] if run.gens else gens
                    live = live + new
                    if join:
                        pm.hook.propd_rows_join(rows=info)
                    continue  # a newcomer's first token may already end it
            t_step = time.perf_counter()
            ctx_len = max(cache.host_lengths)
            ctx = StepContext(step=step, row_ids=tuple(live), lengths=cache.lengths.clone(),
                              host_lengths=tuple(cache.host_lengths), num_generated=tuple(len(out[r]) for r in live),
                              roots=roots, last_hidden=last_hidden, vocab_size=model.config.vocab_size, device=dev,
                              history=history, accepted_hidden=acc_hidden, accepted_counts=acc_counts,
                              sampling=params, generators=tuple(gens))
            budget: DraftTree = pm.hook.propd_tree(ctx=ctx)
            if not isinstance(budget, DraftTree):
                raise self._fault("sizer", f"{_kind(budget)} from propd_tree, not a DraftTree")
            # steps of one kind (batch size, tree size) are compared for the thread count; the kind is this step's
            # own budget, so that a sizer mixing sizes does not look like a slowdown of one kind
            kind = (len(live), budget.num_nodes)
            if tuner is not None:
                tuner.begin(kind)
            draft, draft_s = None, 0.0
            if budget.num_nodes > 1:
                if not self.has_proposer:
                    raise PropdError(f"the sizer chose a {budget.num_nodes}-node tree but no proposer is registered")
                t_draft = time.perf_counter()
                draft = self._as_draft(pm.hook.propd_propose(ctx=ctx, tree=budget), budget, roots)
                draft_s = time.perf_counter() - t_draft
            B = len(live)
            if draft is None:  # a plain AR step
                draft = Draft(tokens=roots[:, None], tree=self._single(dev))
            T_real = draft.num_nodes
            if self.static_shapes:
                draft = _pad_draft(draft, next((w for w in STATIC_WIDTHS if w >= T_real), T_real))
            tokens, rows_tree = draft.tokens, draft.rows
            T = tokens.shape[1]
            width = T if self.static_shapes else None
            cache.reserve(ctx_len + T + 1)
            if history.shape[1] < ctx_len + T + 2:
                history = torch.nn.functional.pad(history, (0, ctx_len + T + 66 - history.shape[1]))
            shared = rows_tree.shared
            tree_mask, tree_depths = (shared.mask, shared.depths) if shared is not None else (rows_tree.mask,
                                                                                               rows_tree.depths)
            if draft.present is not None:
                node_idx, valid = survivors(rows_tree.keep_closure(draft.present), pad_index=T, width=width)
                h = m.embed(torch.cat([tokens, tokens[:, :1]], dim=1).gather(1, node_idx))  # (B, T', H)
            else:
                node_idx = torch.arange(T, device=dev).expand(B, T)
                valid = torch.ones(B, T, dtype=torch.bool, device=dev)
                h = m.embed(tokens)  # (B, T, H)
            attn = m.attention_inputs(cache, node_idx, tree_mask, tree_depths)
            start = 0
            for layer in self.prune_layers if T > 1 else ():
                h = m.run_layers(h, start, layer, cache, attn)
                start = layer
                nodes = LiveNodes(node_idx, valid, T)
                kw = dict(ctx=ctx, draft=draft, nodes=nodes, hidden=h, layer=layer, tree=draft.tree, tokens=tokens,
                          node_idx=node_idx, valid=valid)
                keeps = []
                for impl in self._pruners_at[layer]:
                    k = impl.function(**{a: kw[a] for a in impl.argnames})
                    if k is not None:
                        keeps.append(self._checked_keep(impl, k, (B, T)))
                if not keeps:
                    continue
                keep = nodes.alive()
                for k in keeps:
                    keep = keep & k
                new_idx, valid = survivors(rows_tree.keep_closure(keep), pad_index=T, width=width)
                h = h.gather(1, positions_of(node_idx, new_idx, T)[..., None].expand(-1, -1, h.shape[-1]))
                node_idx = new_idx
                attn = m.attention_inputs(cache, node_idx, tree_mask, tree_depths)
            h = m.norm(m.run_layers(h, start, m.num_layers, cache, attn))  # (B, T', H)
            ids = m.screened_argmax(h) if self._argmax_only and pm is self.pm and params.greedy else None  # (B, T')
            if ids is not None:  # the exact argmax per node, as logits 0 there and -inf elsewhere (propd_verify)
                logits = torch.full((*ids.shape, model.config.vocab_size), float("-inf"), device=dev)
                logits.scatter_(2, ids[..., None], 0.0)
            else:
                logits = m.logits(h)  # (B, T', V)
            nodes = LiveNodes(node_idx, valid, T)
            acc = pm.hook.propd_verify(ctx=ctx, draft=draft, nodes=nodes, logits=logits,
                                            tree=draft.tree, tokens=tokens,
                                            node_idx=node_idx, valid=valid)
            ok = self._acceptance_ok(acc, rows_tree, nodes)  # (B,) checked with the step's one sync below
            path = rows_tree.path_to(acc.best.clamp(0, T - 1))  # (B, D+1) root .. best, padded with best
            emitted = torch.cat([tokens.gather(1, path[:, 1:]), acc.bonus[:, None]], dim=1)  # (B, D+1)
            # whether every row's accepted nodes already sit where they are kept (node i at depth i: a chain's
            # prefix), so that the cache moves nothing
            ranks = torch.arange(path.shape[1], device=dev)
            in_place = ((path == ranks) | (ranks > acc.accept_len[:, None])).all(1)
            info = torch.cat([acc.accept_len[:, None], valid.sum(1, keepdim=True), ok[:, None], in_place[:, None],
                              emitted], dim=1).tolist()  # sync
            if not all(row[2] for row in info):
                raise self._fault("verifier", "an Acceptance whose best node is not a surviving tree node, whose "
                                  "accept_len is not that node's depth, or whose bonus token is outside the "
                                  f"vocabulary (0..{model.config.vocab_size - 1})")
            nothing_moves = all(row[3] for row in info)
            for row in info:
                del row[2:4]
            accepted = [row[0] for row in info]
            # the history gains the accepted tokens and the bonus (entries past them are scratch)
            gained_ids = emitted.scatter(1, acc.accept_len[:, None], acc.bonus[:, None])
            history.scatter_(1, cache.lengths[:, None] + 1 + torch.arange(emitted.shape[1], device=dev), gained_ids)
            cache.commit(path, acc.accept_len + 1, [a + 1 for a in accepted], in_place=nothing_moves)
            acc_hidden = nodes.gather(h, path)  # (B, D+1, H): root .. best, padded with best
            acc_counts = acc.accept_len + 1
            last_hidden = acc_hidden.gather(1, acc.accept_len[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]
            roots = acc.bonus
            gained, starts = [], []
            for b, r in enumerate(live):
                a = accepted[b]
                before = len(out[r])
                starts.append(before)
                for t in info[b][2: 2 + a] + [info[b][-1]]:
                    if len(out[r]) >= max_new:
                        break
                    out[r].append(t)
                    if t in eos:
                        break
                run.accepts[r].append(len(out[r]) - before)
                gained.append(a + 1)
            st = StepStats(step=step, batch_size=B, row_ids=tuple(live), context_len=ctx_len, tree_nodes=T_real,
                           nodes_after_pruning=sum(row[1] for row in info) / B, accepted=tuple(gained),
                           step_time_s=time.perf_counter() - t_step, draft_time_s=draft_s,
                           threads=torch.get_num_threads() if dev.type == "cpu" else 0)
            run.stats.append(st)
            if tuner is not None:
                tuner.end(kind, st.step_time_s)
            pm.hook.propd_after_step(ctx=ctx, draft=draft, acceptance=acc, stats=st, tree=budget, tokens=tokens,
                                     path_hidden=acc_hidden)
            for r, before in zip(live, starts):
                run.gained(r, before)
            step += 1

    @staticmethod
    def _thread_tuner(threads: str | int | None, model: LoadedModel) -> ThreadTuner | None:
        if threads is None or model.device.type != "cpu":
            return None
        if threads == "auto":
            return ThreadTuner()
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise PropdError(f"threads must be 'auto', a positive whole number or None, got {threads!r}")
        return ThreadTuner(fixed=threads)

    def _single(self, device: torch.device) -> DraftTree:
        """The 1-node tree of a plain AR step, on ``device``."""
        key = str(device)
        if key not in self._single_trees:
            self._single_trees[key] = DraftTree.from_paths((), device=device)
        return self._single_trees[key]


@attrs.define(eq=False)
class _Run:
    """One ``generate_ids`` call's prompts, settings and results, shared by its batches."""

    prompt_ids: list[list[int]]
    max_new: int
    params: SamplingParams
    gens: list  # one torch.Generator per prompt (sampling), or empty (greedy)
    tokens: list[list[int]]  # per prompt, its new tokens
    accepts: list[list[int]]  # per prompt, tokens gained per step (the prefill's first)
    row_time: list[float]  # per prompt, seconds from its start to its end
    stats: list[StepStats]
    waiting: deque  # prompt indices not started yet
    joins: bool  # whether waiting prompts join running batches
    started: dict = attrs.Factory(dict)  # prompt index -> when its prefill began
    bar: Any = None  # a tqdm progress bar over prompts, or None
    on_tokens: Any = None  # the caller's on_tokens(i, ids), or None
    stop_at: Any = None  # the caller's stop_at(i, ids), or None
    stopped: set = attrs.Factory(set)  # prompts that stop_at ended

    def gained(self, r: int, before: int) -> None:
        """Prompt r's tokens from index ``before`` on are new: ``stop_at`` may end it (its tokens cut, the step's
        count with them), then ``on_tokens`` gets what is left of them."""
        out = self.tokens[r]
        if len(out) <= before:
            return
        if self.stop_at is not None:
            n = self.stop_at(r, out)
            if n is not None:
                if not before <= n <= len(out):
                    raise PropdError(f"stop_at returned {n!r} for prompt {r}; expected {before}..{len(out)}")
                self.accepts[r][-1] -= len(out) - n
                del out[n:]
                self.stopped.add(r)
        if self.on_tokens is not None and len(out) > before:
            self.on_tokens(r, out[before:])


def rows_can_join(obj: Any) -> bool:
    """Whether component ``obj`` takes rows joining a running batch: its ``rows_can_join`` if it says, else yes when
    it implements ``propd_rows_join`` or keeps no per-row state (neither ``propd_rows_begin`` nor
    ``propd_rows_leave``)."""
    said = getattr(obj, "rows_can_join", None)
    if said is not None:
        return bool(said)
    joins, begins, leaves = (callable(getattr(obj, f"propd_rows_{hook}", None)) for hook in ("join", "begin", "leave"))
    return joins or not (begins or leaves)


def fill_holes(n: int, done: set[int]) -> list[int]:
    """The rows that stay when ``done`` leave a batch of ``n``, in their new order: each row keeps its place, and
    each place a leaving row frees below the new size takes a staying row from beyond it, so the KV cache moves one
    row per hole rather than every row after the first that left (:meth:`KVCache.select_rows`)."""
    m = n - len(done)
    keep = list(range(m))
    tail = [b for b in range(m, n) if b not in done]
    for hole, b in zip((h for h in range(m) if h in done), tail):
        keep[hole] = b
    return keep


def check_draft(out: Any, budget: DraftTree, roots: torch.Tensor, vocab_size: int, who: str) -> Draft:
    """A proposer's result as a checked :class:`Draft`: tokens (B, T) int64 inside the vocabulary with column 0 equal
    to the roots, T within the budget, a tree of T nodes (shared, or one per row), optional fields of matching shapes.
    Raises a PropdError naming ``who`` (e.g. "proposer 'medusa'")."""
    B, V, dev = roots.shape[0], vocab_size, roots.device

    def fault(what: str) -> PropdError:
        return PropdError(f"{who} returned {what}")

    if isinstance(out, torch.Tensor):
        if out.dim() != 2 or out.shape[1] != budget.num_nodes:
            raise fault(f"tokens of shape {tuple(out.shape)} for a {budget.num_nodes}-node tree; expected "
                        f"({B}, {budget.num_nodes})")
        out = Draft(tokens=out, tree=budget)
    if not isinstance(out, Draft):
        raise fault(f"{_kind(out)} from propd_propose, not a Draft or a (B, T) tensor")
    tokens, T = out.tokens, None
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise fault(f"Draft.tokens of {_kind(tokens)}, not a (B, T) tensor of token ids")
    T = tokens.shape[1]
    if tokens.shape[0] != B or tokens.dtype != torch.long or tokens.device != dev or not 1 <= T:
        raise fault(f"Draft.tokens of shape {tuple(tokens.shape)}, {tokens.dtype} on {tokens.device}; expected "
                    f"({B}, T) torch.int64 on {dev}")
    if T > budget.num_nodes:
        raise fault(f"a {T}-node draft; the sizer's budget is {budget.num_nodes} nodes")
    tree = out.tree
    if isinstance(tree, DraftTree):
        n = tree.num_nodes
    elif isinstance(tree, RowTrees):
        n = tree.num_nodes
        if tree.batch_size != B:
            raise fault(f"RowTrees for {tree.batch_size} rows; the batch has {B}")
    else:
        raise fault(f"Draft.tree of {_kind(tree)}, not a DraftTree or RowTrees")
    if n != T:
        raise fault(f"a Draft whose tree has {n} nodes but whose tokens have {T} columns")
    for field, shape in (("present", (B, T)), ("probs", (B, T)), ("confidence", (B, T))):
        t = getattr(out, field)
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape):
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else _kind(t)
            raise fault(f"Draft.{field} of {got}; expected {shape}")
    if out.present is not None and out.present.dtype != torch.bool:
        raise fault(f"Draft.present of {out.present.dtype}; expected torch.bool")
    if out.dists is not None and (not isinstance(out.dists, torch.Tensor) or out.dists.shape[:2] != (B, T)):
        raise fault(f"Draft.dists not of shape ({B}, {T}, V)")
    bad_ids = ((tokens < 0) | (tokens >= V)).any()
    bad_root = (tokens[:, 0] != roots).any()
    bad_present = (~out.present[:, 0]).any() if out.present is not None else torch.zeros((), dtype=torch.bool)
    flags = torch.stack([bad_ids, bad_root, bad_present.to(dev)]).tolist()  # one sync for the three checks
    if flags[0]:
        raise fault(f"token ids outside the vocabulary (0..{V - 1})")
    if flags[1]:
        raise fault("tokens whose column 0 is not the step's roots (ctx.roots)")
    if flags[2]:
        raise fault("a Draft whose root (node 0) is not present")
    return out


STATIC_WIDTHS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # node widths of static-shape steps (Decoder(static_shapes=True))


def _pad_draft(draft: Draft, width: int) -> Draft:
    """``draft`` widened to ``width`` nodes per row with absent nodes (children of the root, never run or accepted), as
    per-row trees of known depth: no host sync."""
    B, T = draft.tokens.shape
    if width == T:
        return draft
    rows, pad = draft.rows, width - T
    dev = draft.tokens.device
    parents = torch.cat([rows.parents, torch.zeros(B, pad, dtype=torch.long, device=dev)], dim=1)
    present = draft.present if draft.present is not None else torch.ones(B, T, dtype=torch.bool, device=dev)

    def widen(t):
        return None if t is None else torch.cat([t, t.new_zeros(B, pad, *t.shape[2:])], dim=1)

    return Draft(tokens=torch.cat([draft.tokens, draft.tokens[:, :1].expand(B, pad)], dim=1),
                 tree=RowTrees.from_parents(parents, max_depth=max(rows.max_depth, 1)),
                 present=torch.cat([present, torch.zeros(B, pad, dtype=torch.bool, device=dev)], dim=1),
                 probs=widen(draft.probs), dists=widen(draft.dists), confidence=widen(draft.confidence))


def _kind(obj: Any) -> str:
    return "None" if obj is None else f"a {type(obj).__name__}"


class TextDeltas:
    """Streaming text: ``on_tokens(i, ids)`` for :meth:`Decoder.generate_ids` that calls ``on_text(i, piece)`` with
    the new text of prompt i. Each call decodes the tokens from one piece back (``prefix``) on, so that tokenizers
    whose decoding depends on the token before (SentencePiece's leading spaces) give the same text as decoding all,
    and holds text back while it ends in U+FFFD (a character whose bytes are split across tokens): the incremental
    detokenization of serving engines (vLLM's), in O(piece) per call. :meth:`finish` sends what decoding all of
    them adds, so the pieces add up to the final text."""

    def __init__(self, tokenizer: Any, on_text: Callable[[int, str], Any]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: dict[int, list[int]] = {}
        self.offsets: dict[int, tuple[int, int]] = {}  # prompt -> (prefix, read): decode from prefix, sent to read
        self.sent: dict[int, list[str]] = {}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _send(self, i: int, piece: str) -> None:
        self.sent.setdefault(i, []).append(piece)
        self.on_text(i, piece)

    def __call__(self, i: int, tokens: list[int]) -> None:
        ids = self.ids.setdefault(i, [])
        ids.extend(tokens)
        prefix, read = self.offsets.get(i, (0, 0))
        before, now = self._decode(ids[prefix:read]), self._decode(ids[prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd") and now.startswith(before):
            self._send(i, now[len(before):])
            self.offsets[i] = (read, len(ids))

    def finish(self, i: int, text: str) -> None:
        """Send the rest of prompt i's final ``text`` (its whole decoding)."""
        sent = "".join(self.sent.get(i, []))
        if len(text) > len(sent) and text.startswith(sent):
            self._send(i, text[len(sent):])


def stop_strings(stop: Any) -> list[str]:
    """``generate``'s ``stop`` as a list of strings: one string, or a sequence of them, none empty."""
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
        raise PropdError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return list(stops)


class StopStrings:
    """Stop strings for :meth:`Decoder.generate`: ``stop_at(i, ids)`` for :meth:`Decoder.generate_ids`. Prompt i's
    text is followed token by token (:class:`TextDeltas`); at the first token after which it contains a stop string,
    the prompt ends with the tokens so far, and its text is cut before the string (the earliest, where several
    match). With ``on_text`` it streams, holding back the last len(longest stop) - 1 characters, which could begin a
    stop string, so that the pieces add up to the cut text."""

    def __init__(self, tokenizer: Any, stops: list[str], on_text: Callable[[int, str], Any] | None = None):
        self.stops, self.on_text = stops, on_text
        self.hold = max(len(s) for s in stops) - 1
        self.text: dict[int, str] = {}  # per prompt, its text as followed so far
        self.fed: dict[int, int] = {}  # per prompt, how many of its tokens were followed
        self.sent: dict[int, int] = {}  # per prompt, how many characters went to on_text
        self.cut: dict[int, str] = {}  # prompts that stopped: their text, cut
        self._deltas = TextDeltas(tokenizer, self._follow)

    def _follow(self, i: int, piece: str) -> None:
        self.text[i] = self.text.get(i, "") + piece

    def _stream(self, i: int, upto: int) -> None:
        sent = self.sent.get(i, 0)
        if self.on_text is not None and upto > sent:
            self.on_text(i, self.text[i][sent:upto])
            self.sent[i] = upto

    def __call__(self, i: int, ids: list[int]) -> int | None:
        for j in range(self.fed.get(i, 0), len(ids)):
            before = len(self.text.get(i, ""))
            self._deltas(i, [ids[j]])
            self.fed[i] = j + 1
            text = self.text.get(i, "")
            # an occurrence new with this token ends within the new text, so it starts at most hold chars before it
            hits = [p for p in (text.find(s, max(0, before - self.hold)) for s in self.stops) if p >= 0]
            if hits:
                self.cut[i] = text[:min(hits)]
                self.text[i] = self.cut[i]
                self._stream(i, len(self.cut[i]))
                return j + 1
        self._stream(i, max(0, len(self.text.get(i, "")) - self.hold))
        return None

    def finish(self, i: int, text: str) -> str:
        """Prompt i's final text: cut where it stopped, else ``text`` (its whole decoding), whose rest is streamed."""
        if i not in self.cut:
            self.text[i] = text
        self._stream(i, len(self.text[i]))
        return self.text[i]
