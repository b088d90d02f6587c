"""``propd train-heads --kind eagle``: train an EAGLE feature drafter (:mod:`propd.models.eagle`) on a frozen model.

EAGLE's recipe (Li et al. 2024, arXiv 2401.15077, sec. 4 and SafeAILab/EAGLE ``eagle/train/main.py``), on the base
model's own greedy answers (self-distillation, as for the Medusa heads): for every position t of prompt + answer the
drafter reads (f_t + noise, x_{t+1}) and predicts g_{t+1}; the loss at answer positions is

    v_weight * SmoothL1(g_{t+1}, f_{t+1})  +  p_weight * CE(lm_head(g_{t+1}), x_{t+2})

with f the base model's final normed hidden states, x_{t+2} the base model's greedy token, and EAGLE's uniform input
noise ``(U(0, 1) - 0.5) * noise * 512 / sequence length`` added to the features read. The token loss is taken over
the draft vocabulary (the ``draft_vocab`` most frequent tokens of the training answers), the only tokens the shipped
drafter guesses. With ``p_target="soft"`` the token loss is EAGLE's own (``eagle/train/main.py``): the cross-entropy
against the base model's whole next-token distribution, ``-sum_v softmax(lm_head(f_{t+1}))_v log
softmax(lm_head(g_{t+1}))_v`` (both over the draft vocabulary), which also teaches the ranks below the first that
tree drafts use.

With ``follow_ups`` K > 0, each training prompt also yields K two-turn conversations: its first answer, then a
generic second request (``data.FOLLOW_UPS``, the k-th for prompt i being number (i + k) mod 8), then the model's own
answer to it, trained on like any other answer. The training prompts are few (about 1,400), so this is more text in
the model's voice without more prompts (docs/heads.md, "More text from the same prompts"). With ``tasks`` K > 0, each
also yields K single-turn requests that hand the model its own first answer as a text to work on (``data.TASKS``:
summarize, extract, answer a question about the passage, translate, rewrite, the k-th for prompt i being number
(i + k) mod 8), and the model's answers to them: outputs that copy from or condense a long user-given text, which
plain prompts never ask for. With ``passages`` K > 0, each also yields K such requests around a passage of
other training prompts' text (:func:`_passage`; never a held-out prompt's): text people wrote, which the model
copies and condenses unlike its own. A held-out prompt's conversations are held out with it. With ``self_prompts`` N > 0
the model also writes N user requests itself (Magpie, Xu et al. 2024, arXiv 2406.08464): sampled, at temperature 1,
after its chat template's text up to a user turn's content, kept when the turn ends within ``max_new_tokens`` and
is new; then answered greedily like a training prompt. An instruction-tuned model's own requests come from the
distribution it was tuned on, so they add prompts, not only text, at the cost of generation alone; they are never
held out (validation stays on the given prompts).

With ``ttt_steps`` S > 1 the drafter is also trained as it drafts (EAGLE-3's "training-time test", Li et al. 2025,
arXiv 2503.01840; HASS, Zhang et al. 2024, arXiv 2408.15766): step s reads, at position t, the drafter's own step
s-1 output for f_t (no gradient through it) with the true x_{t+1}, attends to true-feature positions up to its root
t-s+1 and to its own chain above it, and is scored against the same targets; the losses add up with weights
``ttt_decay`` ** (s-1).
Drafting at depth s >= 2 reads predicted features only, so training on teacher-forced features alone leaves a gap.

``gen_dtype`` "bfloat16" generates the answers and reads their features with the base model in bfloat16 (its
own greedy answers in that dtype; about 1.9x float32's rate at batch 16 on a CPU with AVX512-BF16), and
``train_dtype`` "bfloat16" autocasts the drafter's products to bfloat16 in training with float32 weights and
optimizer state, as EAGLE's mixed-precision training does (about 1.6x float32's step there). Both default to
float32; on a CPU without native bf16 dot products bf16 products are emulated and slower.

Stages, each cached in ``OUT/work`` so a rerun resumes: (1) answers (shared with the Medusa trainer's format), then
the follow-up answers; (2) features: the final normed hidden states of prompt + answer, kept while each answer is
generated (:mod:`propd.training.hidden`; the ``ar`` decoder computes them anyway), computed only for answers cached
by an earlier run without them; (3) epochs (a checkpoint per epoch); (4) validation: top-k accuracy
of the drafter's first guess against the base model's next token on the held-out prompts' first answers, written to
``OUT/report.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import attrs
import torch
import torch.nn.functional as F

from propd.errors import PropdError
from propd.models.heads import DRAFT_VOCAB_FILE
from propd.training.data import FOLLOW_UPS, TASKS
from propd.training.hidden import FeatureStore
from propd.training.trainer import (_answers, _log, _save, _val_seqs, generate_in_batches, one_cycle,
                                   training_prompt_ids, training_prompt_texts)

EVAL_TOPK = (1, 3, 5, 10)
_FEATURE_CHUNK = 64  # computed sequences per saved feature file
_FEATURE_BATCH = 8  # sequences per base-model forward
TRAIN_DTYPES = ("float32", "bfloat16")
P_TARGETS = ("greedy", "soft")
MAX_TTT_STEPS = 4  # a step-S batch is an S x longer tree: attention grows as S^2


@attrs.frozen
class EagleTrainConfig:
    model: str
    out: str
    max_prompts: int | None = None  # None: every training prompt
    max_new_tokens: int = 128
    epochs: int = 12
    lr: float = 1e-3
    batch_tokens: int = 4096  # padded positions per optimizer step
    max_len: int = 512  # positions per sequence read in training (the last ones)
    draft_vocab: int = 8192
    noise: float = 0.2  # EAGLE's "std" of the uniform input noise
    v_weight: float = 1.0
    p_weight: float = 0.1
    grad_clip: float = 0.5
    seed: int = 0
    data: str | None = None
    device: str = "cpu"
    gen_batch_size: int = 16
    val_fraction: float = 0.05
    follow_ups: int = 0  # second-turn conversations per training prompt (module docstring), at most len(FOLLOW_UPS)
    tasks: int = 0  # single-turn task requests around each prompt's first answer (module docstring), <= len(TASKS)
    ttt_steps: int = 1  # draft steps unrolled in training (module docstring); 1: EAGLE-1's teacher forcing alone
    ttt_decay: float = 0.8  # loss weight of step s: ttt_decay ** (s - 1)
    self_prompts: int = 0  # user requests written by the model itself (module docstring)
    passages: int = 0  # task requests per training prompt around passages of other prompts' text (module docstring)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    val_each_epoch: bool = False  # validation top-1 after every epoch, in the report's history
    gen_dtype: str = "float32"  # the base model's dtype for the answers and their features (module docstring)
    train_dtype: str = "float32"  # "bfloat16": the drafter's products autocast to bf16 in training (fp32 weights)
    p_target: str = "greedy"  # the token loss's target: "greedy" (x_{t+2}) or "soft" (module docstring)


def train_eagle(cfg: EagleTrainConfig, log: Callable[[str], None] = _log) -> dict:
    """Train a drafter into ``cfg.out`` (module docstring) and return the report."""
    from propd.models.eagle import EagleDrafter
    from propd.models.loading import load_model

    if min(cfg.epochs, cfg.max_new_tokens, cfg.batch_tokens, cfg.max_len, cfg.draft_vocab) < 1:
        raise PropdError("--epochs, --max-new-tokens and the batch, length and vocabulary sizes must be positive")
    if not 0 <= cfg.follow_ups <= len(FOLLOW_UPS):
        raise PropdError(f"--follow-ups must be 0-{len(FOLLOW_UPS)}, got {cfg.follow_ups}")
    for flag, count in (("--tasks", cfg.tasks), ("--passages", cfg.passages)):
        if not 0 <= count <= len(TASKS):
            raise PropdError(f"{flag} must be 0-{len(TASKS)}, got {count}")
    if not 1 <= cfg.ttt_steps <= MAX_TTT_STEPS:
        raise PropdError(f"--ttt-steps must be 1-{MAX_TTT_STEPS}, got {cfg.ttt_steps}")
    if cfg.self_prompts < 0:
        raise PropdError(f"--self-prompts must be 0 or more, got {cfg.self_prompts}")
    if cfg.weight_decay < 0:
        raise PropdError(f"--weight-decay must be 0 or more, got {cfg.weight_decay}")
    for flag, value, allowed in (("--gen-dtype", cfg.gen_dtype, TRAIN_DTYPES),
                                 ("--train-dtype", cfg.train_dtype, TRAIN_DTYPES),
                                 ("--p-target", cfg.p_target, P_TARGETS)):
        if value not in allowed:
            raise PropdError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.model, device=cfg.device, dtype="float32", heads="none")  # the drafter's embed, lm_head
    _check_generation(work, cfg, model.name)
    gen_model = (model if cfg.gen_dtype == "float32"
                 else load_model(cfg.model, device=cfg.device, dtype=cfg.gen_dtype, heads="none"))
    for flag, count, why in (("--follow-ups", cfg.follow_ups, "write second turns"),
                             ("--self-prompts", cfg.self_prompts, "start a user turn")):
        if count and not getattr(model.tokenizer, "chat_template", None):
            raise PropdError(f"{flag} needs a chat template to {why}; {model.name}'s tokenizer has none")
    store = FeatureStore(work / "hidden")  # hidden states kept while the answers are generated
    decoder, prompt_ids = training_prompt_ids(gen_model, cfg, observers=[store.recorder])

    answers = _answers(decoder, prompt_ids, cfg, work, log, store)  # (1)
    n0 = len(prompt_ids)
    val = _val_seqs(n0, cfg)
    extras = []  # (kind, ids, answers, owning training prompt) of the extra conversations
    for kind, count in (("follow_ups", cfg.follow_ups), ("tasks", cfg.tasks), ("passages", cfg.passages)):
        if count:
            extras.append((kind, *_extra_conversations(kind, decoder, prompt_ids, answers, cfg, work, log, store)))
    if cfg.self_prompts:
        extras.append(("self_prompts", *_self_prompt_conversations(decoder, cfg, work, log, store)))
    stage_s = {"answers": time.perf_counter() - t_start}
    owners: dict[str, list[int]] = {}
    for kind, x_ids, x_answers, x_owners in extras:
        val |= {len(prompt_ids) + j for j, i in enumerate(x_owners) if i in val}  # held out with their prompt
        prompt_ids, answers = prompt_ids + x_ids, answers + x_answers
        owners[kind] = x_owners
    feats = _features(gen_model, prompt_ids, answers, store, log)  # (2)
    stage_s["features"] = time.perf_counter() - t_start - sum(stage_s.values())
    n = len(prompt_ids)
    train_seqs = [i for i in range(n) if i not in val and len(answers[i]) > 1]
    val_seqs = sorted(i for i in val if len(answers[i]) > 1 and i < n0)  # first answers only
    vocab = _draft_vocab(out, answers, prompt_ids, train_seqs, cfg.draft_vocab, model.config.vocab_size, model.name)
    log(f"{len(train_seqs)} training and {len(val_seqs)} validation sequences; draft vocabulary {len(vocab)} tokens")

    # (3) training
    m = model.model
    drafter = EagleDrafter(attrs.evolve(m.cfg, num_layers=1), bias=False).to(model.device).attach(m)
    w_draft, to_draft = draft_projection(m, vocab)
    batches = _batches(train_seqs, feats, cfg)
    steps = len(batches) * cfg.epochs
    opt = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = one_cycle(opt, cfg.lr, steps)
    ckpt = work / "eagle_checkpoint.pt"
    first_epoch, history, last_val = 0, [], None  # last_val: the last epoch's validation, with val_each_epoch
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if _same_config(state.get("config"), cfg):
            drafter.load_state_dict(state["drafter"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            torch.set_rng_state(state["rng"])
            first_epoch, history = state["epoch"], state["history"]
            log(f"resuming after epoch {first_epoch}")
    from tqdm import tqdm

    amp = dict(device_type=model.device.type, dtype=torch.bfloat16, enabled=cfg.train_dtype == "bfloat16")
    for epoch in range(first_epoch, cfg.epochs):
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        order = torch.randperm(len(batches), generator=g).tolist()
        sums = {"loss": 0.0, "vloss": 0.0, "ploss": 0.0, "acc": 0.0}
        bar = tqdm(order, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", file=sys.stderr)
        for count, b in enumerate(bar, 1):
            with torch.autocast(**amp):
                parts = _batch_loss(drafter, feats, batches[b], w_draft, to_draft, cfg, noise=True, gen=g)
                loss = cfg.v_weight * parts["vloss"] + cfg.p_weight * parts["ploss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(drafter.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            sums["loss"] += loss.item()
            for k in ("vloss", "ploss"):
                sums[k] += parts[k].item()
            sums["acc"] += parts["acc"]
            bar.set_postfix(loss=f"{sums['loss'] / count:.3f}", acc=f"{sums['acc'] / count:.3f}")
        means = {f"train_{k}": round(v / max(len(order), 1), 4) for k, v in sums.items()}
        if cfg.val_each_epoch:
            v = last_val = evaluate(drafter, feats, val_seqs, w_draft, to_draft, cfg)
            means |= {"val_top1": round(v["top1"], 4), "val_step2_top1": round(v["step2_top1"], 4)}
            log(f"epoch {epoch + 1}: validation top-1 {v['top1']:.4f}, second step {v['step2_top1']:.4f}")
        history.append({"epoch": epoch + 1, **means})
        _save(ckpt, {"config": attrs.asdict(cfg), "drafter": drafter.state_dict(), "opt": opt.state_dict(),
                     "sched": sched.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch + 1,
                     "history": history})
    stage_s["training"] = time.perf_counter() - t_start - sum(stage_s.values())

    # (4) validation and the shipped files
    log("[4/4] measuring validation accuracy")
    report = {"validation": last_val or evaluate(drafter, feats, val_seqs, w_draft, to_draft, cfg)}
    drafter.save(out, dtype=torch.bfloat16, base_model=model.name, trained_by="propd train-heads --kind eagle")
    report.update({"model": model.name, "kind": "eagle", "config": attrs.asdict(cfg), "history": history,
                   "follow_up_sequences": len(owners.get("follow_ups", [])),
                   "task_sequences": len(owners.get("tasks", [])),
                   "passage_sequences": len(owners.get("passages", [])),
                   "self_prompt_sequences": len(owners.get("self_prompts", [])),
                   "train_sequences": len(train_seqs), "val_sequences": len(val_seqs),
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "wall_time_s": round(time.perf_counter() - t_start, 1),
                   "stage_wall_time_s": {k: round(v, 1) for k, v in stage_s.items()}})
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"EAGLE drafter written to {out} ({report['wall_time_s']:.0f}s this run)")
    return report


def _check_generation(work: Path, cfg: EagleTrainConfig, model_name: str) -> None:
    """Record in ``work/generation.json`` the dtype the cached answers and features are generated in; a rerun with
    another ``gen_dtype`` would mix two models' outputs, so it is refused."""
    path = work / "generation.json"
    if path.is_file():
        have = json.loads(path.read_text()).get("gen_dtype", "float32")
    else:  # answers or samples cached before this record existed are float32's
        have = "float32" if any(work.glob("*.jsonl")) else cfg.gen_dtype
    if have != cfg.gen_dtype:
        raise PropdError(f"{work} holds answers generated in {have}; rerun with --gen-dtype {have} or another --out")
    if not path.is_file():
        path.write_text(json.dumps({"model": model_name, "gen_dtype": have}) + "\n")


def _draft_vocab(out: Path, answers, prompt_ids, train_seqs, size: int, vocab: int, name: str) -> list[int]:
    """The ``size`` tokens most frequent in the training answers (then in their prompts), written to
    ``draft_vocab.json``; ties by id."""
    counts = torch.bincount(torch.tensor([t for i in train_seqs for t in answers[i]], dtype=torch.long),
                            minlength=vocab)
    counts_p = torch.bincount(torch.tensor([t for i in train_seqs for t in prompt_ids[i]], dtype=torch.long),
                              minlength=vocab)
    key = counts.double() * (counts_p.sum() + 1) + counts_p.double()  # answers first, then prompts
    order = sorted(range(vocab), key=lambda i: (-float(key[i]), i))
    ids = [i for i in order if key[i] > 0][:size]
    (out / DRAFT_VOCAB_FILE).parent.mkdir(parents=True, exist_ok=True)
    (out / DRAFT_VOCAB_FILE).write_text(json.dumps({
        "source": f"greedy answers of {name} to {len(train_seqs)} training prompts, then the prompts' tokens "
                  "(propd train-heads --kind eagle)", "from_answers": int((counts > 0).sum()), "ids": ids}) + "\n")
    return ids


def _features(model, prompt_ids, answers, store: FeatureStore, log) -> dict:
    """Final normed hidden states (bf16) of every position of each prompt + answer: those kept in ``store`` while the
    answers were generated, the others computed now in fp32 (sequences of similar length batched) and added to it.
    Returns ``{"f": [(N_i, H)], "tokens": [[N_i ids]], "prompt": [P_i]}``."""
    from tqdm import tqdm

    seqs = [p + a for p, a in zip(prompt_ids, answers)]
    f = [store.get(s) for s in seqs]
    todo = sorted((i for i, x in enumerate(f) if x is None), key=lambda i: (len(seqs[i]), i))  # little padding
    if todo:
        log(f"[2/4] computing hidden states for {len(todo)} of {len(seqs)} sequences (the others were kept while "
            "their answers were generated)")
    m = model.model
    done = []
    with torch.inference_mode():
        for b in tqdm(range(0, len(todo), _FEATURE_BATCH), desc="features", unit="batch", file=sys.stderr,
                      disable=not todo):
            rows = todo[b: b + _FEATURE_BATCH]
            h, _ = m.hidden_states(m.new_cache(len(rows), max(len(seqs[i]) for i in rows) + 2), [seqs[i] for i in rows])
            for j, i in enumerate(rows):
                f[i] = h[j, : len(seqs[i])].to(device="cpu", dtype=torch.bfloat16).clone()
                done.append((seqs[i], f[i]))
            if len(done) >= _FEATURE_CHUNK or b + _FEATURE_BATCH >= len(todo):
                store.add(done)
                done = []
    return {"f": f, "tokens": seqs, "prompt": [len(p) for p in prompt_ids]}


def _extra_conversations(kind: str, decoder, prompt_ids, answers, cfg: EagleTrainConfig, work: Path, log,
                         store: FeatureStore | None = None) -> tuple:
    """The extra conversations built on each training prompt's first answer (module docstring), with the model's
    greedy answers: ``kind`` "follow_ups", the prompt, the first answer and a second request (``FOLLOW_UPS``);
    "tasks", one user turn wrapping the first answer (``TASKS``); "passages", one wrapping a passage of other
    training prompts' text (:func:`_passage`). The k-th for prompt i takes request (i + k) mod 8.
    Answers are cached in ``work/follow_up_answers.jsonl``, ``work/task_answers.jsonl`` or
    ``work/passage_answers.jsonl`` by (prompt, k), so that another ``--max-prompts`` or K reuses them. Returns the
    ids, the answers, and for each the training prompt it belongs to."""
    from propd.chat import conversation

    tok = decoder.model.tokenizer
    texts = training_prompt_texts(cfg)
    cap = decoder.model.config.max_position_embeddings - cfg.max_new_tokens
    if kind == "follow_ups":
        count, turns, cached, what = cfg.follow_ups, FOLLOW_UPS, "follow_up_answers.jsonl", "follow-up turns"
    elif kind == "tasks":
        count, turns, cached, what = cfg.tasks, TASKS, "task_answers.jsonl", "task requests"
    else:
        count, turns, cached, what = cfg.passages, TASKS, "passage_answers.jsonl", "passage requests"
    pairs = [(i, k) for i in range(len(prompt_ids)) for k in range(count) if len(answers[i]) > 1]
    held_out = _val_seqs(len(texts), cfg)
    ids = {}
    for i, k in pairs:
        turn = turns[(i + k) % len(turns)]
        if kind == "passages":  # whole parts are dropped until the request fits the context
            parts = _passage(texts, held_out, i, k, cfg.seed)
            ids[i, k] = decoder.encode([turn.format(text="\n\n".join(parts))])[0]
            while len(ids[i, k]) > cap and len(parts) > 1:
                parts.pop()
                ids[i, k] = decoder.encode([turn.format(text="\n\n".join(parts))])[0]
            ids[i, k] = ids[i, k][-cap:]
            continue
        first = tok.decode(answers[i], skip_special_tokens=True).strip() or "..."
        if kind == "follow_ups":
            ids[i, k] = decoder.encode([conversation([texts[i], turn], [first])])[0][-cap:]
        else:
            ids[i, k] = decoder.encode([turn.format(text=first)])[0][-cap:]
    done = _cached_answers(decoder, pairs, ids, cfg, work / cached, what, log, store)
    return [ids[p] for p in pairs], [done[p] for p in pairs], [i for i, _ in pairs]


def _cached_answers(decoder, pairs: list[tuple[int, int]], ids: dict, cfg: EagleTrainConfig, path: Path, what: str,
                    log, store: FeatureStore | None = None) -> dict:
    """The model's greedy answers to prompts ``ids[p]`` for each key p of ``pairs``, cached in ``path`` by key and
    prompt (a key whose prompt changed is answered again); their hidden states kept in ``store``."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done[r["i"], r["k"]] = r
    todo = [p for p in pairs if p not in done or done[p]["prompt"] != ids[p]]
    if todo:
        log(f"[1/4] generating answers to {len(todo)} {what} ({len(pairs) - len(todo)} cached)")
        with path.open("a") as f:
            for rows, outs in generate_in_batches(decoder, [ids[p] for p in todo], cfg, what.replace(" ", "-"),
                                                  store):
                for r, out in zip(rows, outs):
                    i, k = todo[r]
                    done[i, k] = {"i": i, "k": k, "prompt": ids[i, k], "answer": out}
                    f.write(json.dumps(done[i, k]) + "\n")
                f.flush()
    return {p: done[p]["answer"] for p in pairs}


PASSAGE_CHARS = 3000  # a passage's length: about 700 tokens of English
_PASSAGE_PART_CHARS = 1500  # at most this much of one prompt's text


def _passage(texts: list[str], held_out: set[int], i: int, k: int, seed: int) -> list[str]:
    """The parts of passage k of training prompt i (joined by blank lines): the texts of other prompts, none in
    ``held_out``, drawn in a seeded order, each cut to its first ``_PASSAGE_PART_CHARS`` characters, until they
    reach ``PASSAGE_CHARS`` together."""
    pool = [j for j in range(len(texts)) if j not in held_out and j != i]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed * 1_000_003 + i * 16 + k))
    parts, size = [], 0
    for j in order.tolist():
        part = texts[pool[j]].strip()[:_PASSAGE_PART_CHARS]
        parts.append(part)
        size += len(part)
        if size >= PASSAGE_CHARS:
            break
    return parts


_SELF_PROMPT_GROUP = 256  # request j's answer is cached under the key (j, j // this)


def _self_prompt_conversations(decoder, cfg: EagleTrainConfig, work: Path, log,
                               store: FeatureStore | None = None) -> tuple:
    """``cfg.self_prompts`` user requests written by the model (module docstring), through the chat template, with
    its greedy answers; as :func:`_extra_conversations` returns, owned by no training prompt (-1).

    The samples are drawn in batches of ``gen_batch_size`` (batch b seeded ``(seed, b)``) and cached raw in
    ``work/self_prompts.jsonl``, so a rerun or a larger N keeps the requests it has; a sample is kept when it ends
    the user turn (one of the model's end-of-sequence tokens) within ``max_new_tokens``, has 16 characters or more,
    and is not a copy of an earlier one. Up to 4N samples are drawn; fewer kept requests are logged, not an error."""
    from tqdm import tqdm

    from propd.chat import user_turn_start

    tok = decoder.model.tokenizer
    pre = user_turn_start(tok)
    stops = set(decoder.model.eos_token_ids)
    path = work / "self_prompts.jsonl"
    batches = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    batches = [b for b in batches if b["pre"] == pre and b["max_new_tokens"] == cfg.max_new_tokens]
    texts: list[str] = []
    seen: set[str] = set()

    def keep(batch) -> None:
        for ids in batch["samples"]:
            text = tok.decode(ids, skip_special_tokens=True).strip()
            if ids and ids[-1] in stops and len(text) >= 16 and text not in seen:
                seen.add(text)
                texts.append(text)

    for b in batches:
        keep(b)
    if len(texts) < cfg.self_prompts:
        log(f"[1/4] the model writes {cfg.self_prompts - len(texts)} more user requests (sampled, temperature 1)")
        bar = tqdm(total=cfg.self_prompts, initial=len(texts), desc="self-written requests", unit="request",
                   file=sys.stderr)
        with path.open("a") as f:
            while len(texts) < cfg.self_prompts and len(batches) * cfg.gen_batch_size < 4 * cfg.self_prompts:
                b = len(batches)
                out = decoder.generate_ids([pre] * cfg.gen_batch_size, max_new_tokens=cfg.max_new_tokens,
                                           temperature=1.0, seed=cfg.seed * 1_000_003 + b).token_ids
                batches.append({"pre": pre, "max_new_tokens": cfg.max_new_tokens, "samples": out})
                f.write(json.dumps(batches[-1]) + "\n")
                f.flush()
                kept = len(texts)
                keep(batches[-1])
                bar.update(min(len(texts), cfg.self_prompts) - min(kept, cfg.self_prompts))
        bar.close()
    texts = texts[: cfg.self_prompts]
    if len(texts) < cfg.self_prompts:
        log(f"only {len(texts)} of {cfg.self_prompts} self-written requests kept from {len(batches)} batches")
    cap = decoder.model.config.max_position_embeddings - cfg.max_new_tokens
    pairs = [(j, j // _SELF_PROMPT_GROUP) for j in range(len(texts))]
    ids = {p: x[-cap:] for p, x in zip(pairs, decoder.encode(texts))}
    done = _cached_answers(decoder, pairs, ids, cfg, work / "self_prompt_answers.jsonl", "self-written requests", log,
                           store)
    return [ids[p] for p in pairs], [done[p] for p in pairs], [-1] * len(pairs)


def draft_projection(m, vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """For a draft vocabulary ``vocab`` (N token ids) of base model ``m``: the frozen ``lm_head`` rows (N, H) that score
    it, and the map (V,) from a token id to its column, -100 for tokens outside it (cross-entropy's ignore index)."""
    ids = torch.as_tensor(vocab, dtype=torch.long, device=m.lm_head.weight.device)
    to_draft = torch.full((m.cfg.vocab_size,), -100, dtype=torch.long, device=ids.device)
    to_draft[ids] = torch.arange(len(ids), device=ids.device)
    return m.lm_head.weight.detach().index_select(0, ids), to_draft


def _same_config(saved: dict | None, cfg: EagleTrainConfig) -> bool:
    """Whether a checkpoint's config is ``cfg``; fields added since it was saved count as their defaults."""
    if saved is None:
        return False
    defaults = {f.name: f.default for f in attrs.fields(EagleTrainConfig) if f.default is not attrs.NOTHING}
    return {**defaults, **saved} == attrs.asdict(cfg)


def _batches(seqs: list[int], feats: dict, cfg: EagleTrainConfig) -> list[list[int]]:
    """Sequences grouped by length into batches of at most ``batch_tokens`` padded positions."""
    length = {i: min(len(feats["tokens"][i]), cfg.max_len) for i in seqs}
    out, cur = [], []
    for i in sorted(seqs, key=lambda i: (length[i], i)):
        if cur and (len(cur) + 1) * length[i] > cfg.batch_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _batch_loss(drafter, feats: dict, rows: list[int], w_draft, to_draft, cfg: EagleTrainConfig, noise: bool,
                gen: torch.Generator | None = None, steps: int | None = None) -> dict:
    """Losses and top-1 accuracy on sequences ``rows`` (the last ``max_len`` positions of each), over ``steps``
    (default ``cfg.ttt_steps``) unrolled draft steps (module docstring).

    Position t reads (f_t, x_{t+1}) and is scored at the answer's positions: x_{t+2} is a generated token. Returns
    the weighted ``vloss`` and ``ploss``, step 1's ``acc``, and per step the ``logits`` (M_s, N) and ``target`` (M_s)
    of its M_s scored positions (``target`` -100 outside the draft vocabulary)."""
    dev = drafter.device
    S = cfg.ttt_steps if steps is None else steps
    W = max(min(len(feats["tokens"][i]), cfg.max_len) for i in rows) - 1
    B, H = len(rows), drafter.cfg.hidden_size
    f = torch.zeros(B, W + 1, H)
    tok = torch.zeros(B, W + 1, dtype=torch.long)
    score = torch.zeros(B, W, dtype=torch.bool)
    n = torch.zeros(B, dtype=torch.long)
    for b, i in enumerate(rows):
        ids = feats["tokens"][i]
        N = min(len(ids), cfg.max_len)
        first = len(ids) - N  # the window's first position in the sequence
        f[b, :N] = feats["f"][i][first:].float()
        tok[b, :N] = torch.tensor(ids[first:])
        t = torch.arange(N - 1) + first  # sequence position read at window index 0 .. N-2
        score[b, : N - 1] = (t + 2 >= feats["prompt"][i]) & (t + 2 <= len(ids) - 1)
        n[b] = N - 1
    f, tok, score, n = f.to(dev), tok.to(dev), score.to(dev), n.to(dev)
    x = f[:, :-1]
    if noise:
        x = x + (torch.rand(x.shape, generator=gen).to(dev) - 0.5) * cfg.noise * 512 / W
    inputs = [x]
    for _ in range(1, S):  # step s reads step s-1's output at t-1 in place of f_t
        with torch.no_grad():
            prev = _unrolled(drafter, inputs, tok[:, 1:], n)[-1]
        inputs.append(torch.cat([prev.new_zeros(B, 1, H), prev[:, :-1]], dim=1))
    outs = _unrolled(drafter, inputs, tok[:, 1:], n)
    target_tok = to_draft[torch.cat([tok[:, 2:], tok.new_zeros(B, 1)], dim=1)]  # (B, W), -100 outside the vocabulary
    vloss = ploss = 0.0
    logits_s, target_s = [], []
    soft = None
    for s, g in enumerate(outs):
        scored = score.clone()
        scored[:, :s] = False  # step s + 1 at position t has its root at t - s
        mask = scored.float()
        v = (F.smooth_l1_loss(g, f[:, 1:], reduction="none").mean(-1) * mask).sum() / mask.sum().clamp(min=1)
        logits = F.linear(g[scored], w_draft)  # (M, N): only the scored (answer) positions need the vocabulary
        tgt = target_tok[scored]
        if cfg.p_target == "soft":  # the base model's distribution at f_{t+1}, over the draft vocabulary
            if soft is None:
                with torch.no_grad():
                    soft = torch.softmax(F.linear(f[:, 1:][score], w_draft).float(), dim=-1)  # (M_1, N)
            p_soft = soft[scored[score]]  # step s scores a subset of step 1's positions
            p = -(p_soft * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean() if len(p_soft) \
                else logits.sum() * 0.0
        else:
            p = F.cross_entropy(logits.float(), tgt, ignore_index=-100)
            if not bool((tgt != -100).any()):
                p = logits.sum() * 0.0
        w = cfg.ttt_decay ** s  # a sum, as EAGLE-3: step 1 keeps the gradient it has without the later steps
        vloss, ploss = vloss + w * v, ploss + w * p
        logits_s.append(logits.detach())
        target_s.append(tgt)
    with torch.no_grad():
        tgt = target_s[0]
        hit = (logits_s[0].argmax(-1) == tgt) & (tgt != -100)
        acc = hit.sum().float() / (tgt != -100).sum().clamp(min=1)
    return {"vloss": vloss, "ploss": ploss, "acc": acc.item(), "logits": logits_s, "target": target_s,
            "scored": score}


def _unrolled(drafter, inputs: list[torch.Tensor], next_tokens: torch.Tensor, n: torch.Tensor) -> list[torch.Tensor]:
    """One forward over S = len(inputs) unrolled steps of W positions each, as one tree of S*W nodes.

    ``inputs[s]`` (B, W, H) are step s+1's features; every step reads the same ``next_tokens`` (B, W). Step a's node
    at position i sees step 1's nodes at positions <= i - a + 1 (true features: the accepted context of its root)
    and step b's node at i - a + b for 2 <= b <= a (its own chain), as drafting depth a from root i - a + 1 would.
    Positions j >= n[b] are padding. Returns each step's output (B, W, H)."""
    S, (B, W, _) = len(inputs), inputs[0].shape
    dev = inputs[0].device
    i = torch.arange(W, device=dev)
    mask = torch.zeros(S, W, S, W, dtype=torch.bool, device=dev)  # (step a, position i, step b, position j)
    for a in range(S):
        mask[a, :, 0] = i[None, :] <= i[:, None] - a
        for b in range(1, a + 1):
            mask[a, :, b] = i[None, :] == i[:, None] - a + b
    T = S * W
    cache = drafter.new_cache(B, T + 2)
    node = torch.arange(T, device=dev)[None, :].expand(B, T)
    node = torch.where((node % W) < n[:, None], node, torch.full_like(node, T))
    a = drafter.attention_inputs(cache, node, mask.reshape(T, T), i.repeat(S))
    g = drafter(torch.cat(inputs, dim=1), next_tokens.repeat(1, S), cache, a)  # (B, T, H)
    return list(g.split(W, dim=1))


@torch.no_grad()
def evaluate(drafter, feats: dict, seqs: list[int], w_draft, to_draft, cfg: EagleTrainConfig) -> dict:
    """Top-k accuracy of the drafter's first guess (teacher-forced features) against the base model's greedy next
    token, at the answer positions of ``seqs``, and ``step2_top1``: the top-1 accuracy of its second step, which
    reads its own first predicted feature (the true tokens: the chance of a second hit after a first). Tokens
    outside the draft vocabulary count as misses; ``vloss`` and ``ploss`` are the first step's."""
    one = attrs.evolve(cfg, ttt_steps=1)
    hits = torch.zeros(len(EVAL_TOPK))
    total, vloss, ploss, nb, hits2, total2 = 0, 0.0, 0.0, 0, 0, 0
    for rows in _batches(seqs, feats, cfg):
        parts = _batch_loss(drafter, feats, rows, w_draft, to_draft, one, noise=False)
        valid = parts["target"][0] != -100
        top = parts["logits"][0].topk(min(max(EVAL_TOPK), parts["logits"][0].shape[-1]), dim=-1).indices
        for j, k in enumerate(EVAL_TOPK):
            hits[j] += ((top[..., :k] == parts["target"][0][..., None]).any(-1) & valid).sum().item()
        total += int(parts["scored"].sum())
        vloss, ploss, nb = vloss + float(parts["vloss"]), ploss + float(parts["ploss"]), nb + 1
        two = _batch_loss(drafter, feats, rows, w_draft, to_draft, one, noise=False, steps=2)
        tgt = two["target"][1]
        hits2 += int(((two["logits"][1].argmax(-1) == tgt) & (tgt != -100)).sum())
        total2 += int(two["scored"][:, 1:].sum())
    tops = {f"top{k}": round(float(hits[j]) / max(total, 1), 4) for j, k in enumerate(EVAL_TOPK)}
    return {"positions": total, **tops,
            "step2_top1": round(hits2 / max(total2, 1), 4),
            "vloss": round(vloss / max(nb, 1), 4), "ploss": round(ploss / max(nb, 1), 4)}
