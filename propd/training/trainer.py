"""``propd train-heads``: self-distillation of Medusa heads and early-exit heads on a frozen base model.

Medusa-1 with self-distillation (Cai et al. 2023, section 3.2): the training targets are the model's own greedy
answers to training prompts, so the heads learn what the model will actually say. Head i at position t predicts the
token at t + i + 2 from the final normed hidden state at t: ``lm_head(ResBlock_i(h_t))``, lm_head shared and frozen.

Early heads (ProPD, Zhong et al. 2024, section 4.1 and Fig. 3a): for layer n, ``lm_head(norm(ResBlock_n(h^n_t)))``
predicts the full model's next token (the greedy answer's token at t + 1) from the hidden state after n layers.

Stages, each cached in ``OUT/work`` so a rerun resumes: (1) answers, generated in batches on propd's own engine;
(2) hidden states, computed once; (3) epochs over the cached features (a checkpoint per epoch); (4) validation
accuracies (top-k) on held-out prompts, written to ``OUT/report.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import attrs
import torch
import torch.nn.functional as F

from propd.errors import PropdError
from propd.models.heads import DRAFT_VOCAB_FILE, EarlyHeads, MedusaHeads, write_draft_vocab
from propd.training.data import DEFAULT_MAX_PROMPTS

MEDUSA_TOPK = (1, 5, 10, 50)
CURVE_RANKS = 10  # cumulative top-1..10 per head, for tree construction (propd.tree.best_tree)
EARLY_TOPK = (1, 5, 10, 50, 100, 200)
_FEATURE_BATCH = 8  # answers per hidden-state forward pass


@attrs.frozen
class TrainConfig:
    model: str
    out: str
    num_heads: int = 4
    head_layers: int = 1  # ResBlocks per Medusa head (Medusa-1: 1)
    early_layers: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    max_prompts: int | None = DEFAULT_MAX_PROMPTS
    max_new_tokens: int = 96
    epochs: int = 2
    device: str = "cpu"
    seed: int = 0
    data: str | None = None
    gen_batch_size: int = 16
    train_batch_tokens: int = 256
    lr: float = 3e-3  # chosen on the validation split of the training prompts: 3e-3 beat 1e-3 (2 epochs)
    val_fraction: float = 0.1
    feature_dtype: str = "float32"  # dtype of the model pass that computes training features (stored as bf16)


def _log(msg: str) -> None:
    print(f"propd: {msg}", file=sys.stderr, flush=True)


def train_heads(cfg: TrainConfig, log: Callable[[str], None] = _log, draft_vocab_only: bool = False) -> dict:
    """Train heads into ``cfg.out`` (see the module docstring) and return the report. ``draft_vocab_only``: run
    stage (1) alone and write ``draft_vocab.json`` (and its entry in ``report.json``) for heads already in
    ``cfg.out``; the same config gives the same prompts, answers and split as the training run."""
    from tqdm import tqdm

    from propd.models.loading import load_model

    if min(cfg.num_heads, cfg.head_layers, cfg.epochs, cfg.max_new_tokens) < 1:
        raise PropdError("--num-heads, --head-layers, --epochs and --max-new-tokens must be positive")
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.model, device=cfg.device, dtype="float32")
    L = model.config.num_layers
    bad = [n for n in cfg.early_layers if not 1 <= n < L]
    if bad:
        raise PropdError(f"early layers {bad} out of range (the model has {L} layers: use 1..{L - 1})")
    decoder, prompt_ids = training_prompt_ids(model, cfg)

    # (1) answers: the model's own greedy continuations, appended per batch (resumable)
    answers = _answers(decoder, prompt_ids, cfg, work, log)
    stage_s = {"answers": time.perf_counter() - t_start}
    n_seq = len(prompt_ids)
    val_seqs = _val_seqs(n_seq, cfg)
    if draft_vocab_only:
        report_file = out / "report.json"
        report = json.loads(report_file.read_text()) if report_file.is_file() else {}
        report["draft_vocab"] = _draft_vocab(out, answers, prompt_ids, val_seqs, model.config.vocab_size, model.name)
        report_file.write_text(json.dumps(report, indent=2) + "\n")
        log(f"{out / DRAFT_VOCAB_FILE} written ({report['draft_vocab']['tokens']} tokens)")
        return report
    # (2) features, computed once
    feats = _features(model, prompt_ids, answers, cfg, work, log)
    stage_s["features"] = time.perf_counter() - t_start - sum(stage_s.values())
    n_val = len(val_seqs)
    is_val = torch.tensor([int(s) in val_seqs for s in feats["seq"].tolist()])
    train_idx, val_idx = torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()
    log(f"{len(train_idx)} training and {len(val_idx)} validation positions ({n_seq - n_val}/{n_val} prompts)")

    # (3) training
    H, V = model.config.hidden_size, model.config.vocab_size
    medusa = MedusaHeads(H, V, cfg.num_heads, cfg.head_layers, own_lm_head=False, shared_lm_head=model.model.lm_head)
    early = EarlyHeads(H, list(cfg.early_layers))
    params = list(medusa.parameters()) + list(early.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = -(-len(train_idx) // cfg.train_batch_tokens)
    sched = one_cycle(opt, cfg.lr, steps_per_epoch * cfg.epochs)
    ckpt = work / "checkpoint.pt"
    first_epoch, history = 0, []
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("config") == attrs.asdict(cfg):
            medusa.heads.load_state_dict(state["medusa"])
            early.blocks.load_state_dict(state["early"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            first_epoch, history = state["epoch"], state["history"]
            log(f"resuming after epoch {first_epoch}")
    norm, lm_head = model.model.model.norm, model.model.lm_head
    for epoch in range(first_epoch, cfg.epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(cfg.seed + epoch))]
        total, count = 0.0, 0
        bar = tqdm(range(0, len(order), cfg.train_batch_tokens), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", file=sys.stderr)
        for s in bar:
            idx = order[s: s + cfg.train_batch_tokens]
            # bf16 autocast on CUDA only: on CPUs whose torch build lacks fast bf16 GEMMs (measured on this
            # project's 2-core machine: several times slower than fp32) it would dominate the run
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
                loss = _loss(medusa, early, feats, idx, norm, lm_head, model.device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + loss.item(), count + 1
            bar.set_postfix(loss=f"{total / count:.3f}")
        history.append({"epoch": epoch + 1, "train_loss": total / max(count, 1)})
        _save(ckpt, {"config": attrs.asdict(cfg), "medusa": medusa.heads.state_dict(),
                     "early": early.blocks.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "epoch": epoch + 1, "history": history})

    stage_s["training"] = time.perf_counter() - t_start - sum(stage_s.values())
    # (4) validation accuracies and the shipped files
    log("[4/4] measuring validation accuracy")
    report = evaluate(medusa, early, feats, val_idx, norm, lm_head, model.device)
    medusa.save(out, dtype=torch.bfloat16, base_model=model.name, trained_by="propd train-heads",
                early_layers=list(early.layers))
    early.save(out, dtype=torch.bfloat16)
    report["draft_vocab"] = _draft_vocab(out, answers, prompt_ids, val_seqs, V, model.name)
    report.update({"model": model.name, "config": attrs.asdict(cfg), "history": history,
                   "train_positions": len(train_idx), "val_positions": len(val_idx),
                   # what bit-identical reproduction depends on besides the config: float summation order
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "wall_time_s": round(time.perf_counter() - t_start, 1),
                   "stage_wall_time_s": {k: round(v, 1) for k, v in stage_s.items()}})
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    from propd.training.plots import plot_early_topk

    plot_early_topk(report, out / "early_topk.png")
    log(f"heads written to {out} ({report['wall_time_s']:.0f}s this run)")
    return report


def training_prompt_ids(model, cfg, observers=()) -> tuple:
    """An ``ar`` decoder for ``model`` (with ``observers``) and the token ids of ``cfg``'s training prompts (``data``,
    ``max_prompts``, ``seed``) through the chat template, each cut to its last tokens so that ``max_new_tokens`` more
    fit the context."""
    from propd.decoder import Decoder

    prompts = training_prompt_texts(cfg)
    decoder = Decoder(model, preset="ar", observers=observers)
    cap = model.config.max_position_embeddings - cfg.max_new_tokens
    return decoder, [p[-cap:] for p in decoder.encode(prompts)]


def training_prompt_texts(cfg) -> list[str]:
    """The text of ``cfg``'s training prompts (``data``, ``max_prompts``, ``seed``), in the order of
    :func:`training_prompt_ids`."""
    from propd.training.data import find_train_dir, training_prompts

    return training_prompts(find_train_dir(cfg.data), cfg.max_prompts, cfg.seed)


def _answers(decoder, prompt_ids: list[list[int]], cfg: TrainConfig, work: Path, log, store=None
             ) -> list[list[int]]:
    ans_file = work / "answers.jsonl"
    answers = [json.loads(x) for x in ans_file.read_text().splitlines()] if ans_file.is_file() else []
    answers = answers[: len(prompt_ids)]
    todo = list(range(len(answers), len(prompt_ids)))
    if todo:
        log(f"[1/4] generating answers for {len(todo)} of {len(prompt_ids)} training prompts (greedy, batched)")
        with ans_file.open("a") as f:
            for _, outs in generate_in_batches(decoder, [prompt_ids[i] for i in todo], cfg, "answers", store):
                for ids in outs:
                    f.write(json.dumps(ids) + "\n")
                    answers.append(ids)
                f.flush()
    return answers


def generate_in_batches(decoder, prompts: list[list[int]], cfg, desc: str, store=None):
    """Greedy answers (``cfg.max_new_tokens``) to ``prompts`` in batches of ``cfg.gen_batch_size`` with a progress
    bar, yielded batch by batch as (indices into ``prompts``, answers), so that callers cache each batch. With a
    ``store`` (:class:`propd.training.hidden.FeatureStore`, whose recorder observes ``decoder``), each batch's
    hidden states of prompt + answer are kept there as they are computed."""
    from tqdm import tqdm

    for s in tqdm(range(0, len(prompts), cfg.gen_batch_size), desc=desc, unit="batch", file=sys.stderr):
        rows = list(range(s, min(s + cfg.gen_batch_size, len(prompts))))
        batch = [prompts[i] for i in rows]
        if store is None:
            yield rows, decoder.generate_ids(batch, max_new_tokens=cfg.max_new_tokens).token_ids
            continue
        with store.recorder.recording():
            outs = decoder.generate_ids(batch, max_new_tokens=cfg.max_new_tokens).token_ids
            store.add_recorded(batch, outs)
        yield rows, outs


def _val_seqs(n_seq: int, cfg: TrainConfig) -> set[int]:
    """The prompts held out for validation: a seeded ``val_fraction`` of them."""
    perm = torch.randperm(n_seq, generator=torch.Generator().manual_seed(cfg.seed))
    return set(perm[: max(1, int(round(n_seq * cfg.val_fraction)))].tolist())


def _draft_vocab(out: Path, answers: list[list[int]], prompt_ids: list[list[int]], val_seqs: set[int], vocab: int,
                 name: str) -> dict:
    """Write ``draft_vocab.json`` from the training prompts (their answers' tokens first, then the other tokens of
    the prompts themselves); report how much of the validation answers' text its N most frequent tokens cover (a
    guess outside them is impossible, see :mod:`propd.models.heads`)."""
    train = [i for i in range(len(answers)) if i not in val_seqs]
    f = write_draft_vocab(out, [answers[i] for i in train], vocab, then=[prompt_ids[i] for i in train],
                          source=f"greedy answers of {name} to {len(train)} training prompts, then the prompts' "
                                 "tokens (propd train-heads)")
    rank = {t: r for r, t in enumerate(json.loads(f.read_text())["ids"])}
    val = [rank.get(t, vocab) for i, a in enumerate(answers) if i in val_seqs for t in a]
    sizes = [n for n in (1024, 2048, 4096, 8192, 16384) if n < len(rank)] + [len(rank)]
    return {"tokens": len(rank), "val_tokens": len(val),
            "val_coverage": {str(n): round(sum(r < n for r in val) / max(len(val), 1), 4) for n in sizes}}


def _features(model, prompt_ids, answers, cfg: TrainConfig, work: Path, log) -> dict:
    """Per answer position t (the last prompt token and every answer token but the last): the final normed hidden
    state, the hidden state after each early layer (bf16), and the targets: token t+1, then t+2 .. t+K+1."""
    from tqdm import tqdm

    path = work / "features.pt"
    key = {"layers": list(cfg.early_layers), "heads": cfg.num_heads, "n": len(answers), "dtype": cfg.feature_dtype}
    final, early, targets, seq = [], {n: [] for n in cfg.early_layers}, [], []
    done = 0
    if path.is_file():
        feats = torch.load(path, map_location="cpu", weights_only=False)
        old = feats.get("key") or {}
        if old == key:
            return feats
        n_old = old.get("n", 0)
        # a longer prompt list extends the cached features: the first n_old answers are the same (the seeded order
        # only grows), and batches of _FEATURE_BATCH starting at a multiple of it match a run from scratch
        if {**old, "n": key["n"]} == key and 0 < n_old < key["n"] and n_old % _FEATURE_BATCH == 0:
            done = n_old
            final, targets, seq = [feats["final"]], [feats["targets"]], [feats["seq"]]
            early = {n: [feats["early"][n]] for n in cfg.early_layers}
    log(f"[2/4] computing hidden states for {len(answers) - done} answers (once; {done} cached)")
    import copy

    from propd.models.loading import resolve_dtype

    K = cfg.num_heads
    m = copy.deepcopy(model.model).to(resolve_dtype(cfg.feature_dtype))
    with torch.inference_mode():
        for s in tqdm(range(done, len(answers), _FEATURE_BATCH), desc="features", unit="batch", file=sys.stderr):
            rows = list(range(s, min(s + _FEATURE_BATCH, len(answers))))
            seqs = [prompt_ids[i] + answers[i] for i in rows]
            cache = m.new_cache(len(rows), max(len(x) for x in seqs) + 2)
            h, cap = m.hidden_states(cache, seqs, tuple(cfg.early_layers))
            for b, i in enumerate(rows):
                P, full = len(prompt_ids[i]), seqs[b]
                pos = list(range(P - 1, len(full) - 1))
                if not pos:
                    continue
                final.append(h[b, pos].to(device="cpu", dtype=torch.bfloat16))
                for n in cfg.early_layers:
                    early[n].append(cap[n][b, pos].to(device="cpu", dtype=torch.bfloat16))
                tgt = torch.full((len(pos), K + 1), -100, dtype=torch.long)
                for j, t in enumerate(pos):
                    for k in range(K + 1):
                        if t + 1 + k < len(full):
                            tgt[j, k] = full[t + 1 + k]
                targets.append(tgt)
                seq.append(torch.full((len(pos),), i, dtype=torch.long))
    feats = {"key": key, "final": torch.cat(final), "early": {n: torch.cat(v) for n, v in early.items()},
             "targets": torch.cat(targets), "seq": torch.cat(seq)}
    _save(path, feats)
    return feats


def one_cycle(opt, lr: float, steps: int):
    """The one-cycle learning-rate schedule over ``steps`` optimizer steps, warming up over 5% of them, at least 2
    (torch's schedule divides by zero when the warm-up ends at step 0: 20 or 21 steps at 5%)."""
    warm = 0.05 if steps >= 40 else min(0.99, 2 / steps)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=warm)


def _save(path: Path, obj) -> None:
    """``torch.save`` beside ``path``, then renamed over it: a run stopped mid-write (Ctrl-C, out of disk) leaves the
    previous file whole, so the next run resumes from it instead of failing on half a pickle."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _loss(medusa, early, feats, idx, norm, lm_head, device) -> torch.Tensor:
    x = feats["final"][idx].to(device=device, dtype=torch.float32)
    y = feats["targets"][idx].to(device)
    loss = x.new_zeros(())
    for i, head in enumerate(medusa.heads):
        loss = loss + F.cross_entropy(lm_head(head(x)).float(), y[:, i + 1], ignore_index=-100)
    for n in early.layers:
        xe = feats["early"][n][idx].to(device=device, dtype=torch.float32)
        loss = loss + F.cross_entropy(lm_head(norm(early.blocks[str(n)](xe))).float(), y[:, 0])
    return loss


@torch.no_grad()
def evaluate(medusa, early, feats, idx, norm, lm_head, device, chunk: int = 512) -> dict:
    """Top-k accuracies on positions ``idx``: Medusa head i against token t+i+2; layer n against the full model's
    next token (t+1)."""
    hits_m = torch.zeros(len(medusa.heads), len(MEDUSA_TOPK))
    curve = torch.zeros(len(medusa.heads), CURVE_RANKS)
    count_m = torch.zeros(len(medusa.heads))
    hits_e = {n: torch.zeros(len(EARLY_TOPK)) for n in early.layers}
    count_e = 0
    for s in range(0, len(idx), chunk):
        sub = idx[s: s + chunk]
        x = feats["final"][sub].to(device=device, dtype=torch.float32)
        y = feats["targets"][sub].to(device)
        for i, head in enumerate(medusa.heads):
            logits = lm_head(head(x))
            top = logits.topk(min(max(MEDUSA_TOPK), logits.shape[-1]), dim=-1).indices
            ok = y[:, i + 1] != -100
            for k_i, k in enumerate(MEDUSA_TOPK):
                hits_m[i, k_i] += ((top[:, :k] == y[:, i + 1: i + 2]).any(-1) & ok).sum().item()
            match = (top[:, :CURVE_RANKS] == y[:, i + 1: i + 2]) & ok[:, None]  # (N, R)
            curve[i] += match.cumsum(dim=1).sum(dim=0).float()
            count_m[i] += ok.sum().item()
        count_e += len(sub)
        for n in early.layers:
            xe = feats["early"][n][sub].to(device=device, dtype=torch.float32)
            logits = lm_head(norm(early.blocks[str(n)](xe)))
            top = logits.topk(min(max(EARLY_TOPK), logits.shape[-1]), dim=-1).indices
            for k_i, k in enumerate(EARLY_TOPK):
                hits_e[n][k_i] += (top[:, :k] == y[:, :1]).any(-1).sum().item()
    return {
        "medusa_heads": [{"head": i, "predicts": f"t+{i + 2}", "positions": int(count_m[i]),
                          **{f"top{k}": round(float(hits_m[i, j] / max(count_m[i], 1)), 4)
                             for j, k in enumerate(MEDUSA_TOPK)},
                          "topk_curve": [round(float(c / max(count_m[i], 1)), 4) for c in curve[i]]}
                         for i in range(len(medusa.heads))],
        "early_layers": [{"layer": n, "positions": count_e,
                          **{f"top{k}": round(float(hits_e[n][j] / max(count_e, 1)), 4)
                             for j, k in enumerate(EARLY_TOPK)}} for n in early.layers],
    }
