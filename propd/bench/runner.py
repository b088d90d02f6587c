"""The benchmark runner: every (method, batch size) pair decodes the same prompts in the same order.

Outputs in ``out``: ``run.json`` (configuration, machine), ``answers/<method>-b<B>.jsonl`` in Spec-Bench's answer
format, ``steps/<method>-b<B>.jsonl`` (per-step statistics for the plots), then ``summary.json``, ``summary.md`` and
plots (``propd.bench.report``). Answers are appended as each batch finishes, so an interrupted run leaves valid files
and ``resume`` skips finished batches.

An answer holds, per turn, exactly what Spec-Bench's runners record (``evaluation/eval.py``): ``turns`` (the text,
stripped), ``decoding_steps`` and ``accept_lengths`` of the decoding steps (the prefill, which yields each turn's
first token, is not a step there), ``new_tokens`` and ``wall_time`` (this question's own time, from its batch's start
until its row finished, prefill included). A question's turns are one conversation: turn j is asked after turns
0..j-1 and the model's answers to them. propd adds ``token_ids`` (per turn), ``forward_passes`` (per turn, prefill
included), ``batch_index``, ``batch_size`` and ``batch_wall_time`` (the batch's time, all turns).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import attrs
import torch

from propd.bench.baselines import BASELINES, HFBaseline
from propd.bench.questions import Question, load_questions
from propd.chat import conversation
from propd.errors import PropdError


@attrs.frozen
class BenchConfig:
    questions: str
    out: str
    presets: tuple[str, ...] = ("ar",)
    baselines: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()  # "LABEL=PRESET;ROLE=COMPONENT..." (propd.presets.Method)
    batch_sizes: tuple[int, ...] = (1,)
    categories: tuple[str, ...] | None = None
    per_category: int | None = None
    limit: int | None = None
    turns: str = "all"  # "all": every turn of a question as one conversation (Spec-Bench); "first": turn 1 only
    max_new_tokens: int = 128
    model: str = "smollm2-135m-instruct"
    heads: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    warmup: int = 1
    resume: bool = False
    chat: bool = True
    temperature: float = 0.0  # sampling settings for propd's methods (propd.sampling); 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "platform": platform.platform(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _slug(method: str, bs: int) -> str:
    return f"{method}-b{bs}"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by an interruption: everything before it is complete
    return rows


def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> Path:
    from propd.decoder import Decoder
    from propd.models.loading import load_model
    from propd.presets import Method, get_preset
    from propd.sampling import SamplingParams

    log = log or (lambda m: print(f"propd: {m}", file=sys.stderr, flush=True))
    for p in cfg.presets:
        get_preset(p)
    methods = [Method(p, p) for p in cfg.presets] + [Method.parse(v) for v in cfg.variants]
    labels = [m.label for m in methods] + list(cfg.baselines)
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise PropdError(f"method name(s) {dup} used twice: give each variant its own label")
    for b in cfg.baselines:
        if b not in BASELINES:
            raise PropdError(f"unknown baseline {b!r} (known: {', '.join(BASELINES)})")
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise PropdError("batch sizes must be positive integers")
    if cfg.max_new_tokens <= 0:
        raise PropdError("--max-new-tokens must be positive")
    questions = load_questions(cfg.questions, list(cfg.categories) if cfg.categories else None, cfg.per_category,
                               cfg.limit, cfg.turns)
    out = Path(cfg.out)
    run_file = out / "run.json"
    if run_file.is_file() and not cfg.resume and any((out / "answers").glob("*.jsonl")):
        raise PropdError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, heads=cfg.heads)
    decoders = {m.label: Decoder(model, **m.decoder_kwargs()) for m in methods}
    encoder = Decoder(model, preset="ar")
    if not cfg.chat and any(len(q.turns) > 1 for q in questions):
        raise PropdError("multi-turn questions need the chat template: drop --no-chat, or pass --turns first")

    def encode(messages: list[list[dict]]) -> list[list[int]]:
        return encoder.encode(messages, chat=cfg.chat)

    prompt_ids = encode([conversation(q.turns[:1], []) for q in questions])  # first turns: warm-ups, early errors
    (out / "answers").mkdir(parents=True, exist_ok=True)
    (out / "steps").mkdir(exist_ok=True)
    run_file.write_text(json.dumps({"config": attrs.asdict(cfg), "machine": machine_info(model.device),
                                    "model": model.name, "num_prompts": len(questions)}, indent=2) + "\n")
    runners: dict[str, Callable] = {}
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed)
    SamplingParams(**sampling)  # refuse bad settings before the run
    for p, dec in decoders.items():
        runners[p] = _preset_runner(dec, sampling)
    for b in cfg.baselines:
        runners[b] = _baseline_runner(HFBaseline(model, b), greedy_only=cfg.temperature > 0)
    skip_file = out / "not_run.json"
    total = sum(-(-len(questions) // bs) for _ in runners for bs in cfg.batch_sizes)
    from tqdm import tqdm

    bar = tqdm(total=total, desc="bench", unit="batch", file=sys.stderr, dynamic_ncols=True)
    try:
        for bs in cfg.batch_sizes:
            pairs = []
            for method, runner in runners.items():
                reason = getattr(runner, "unsupported", lambda b: None)(bs)
                if reason:
                    log(f"{method} at batch size {bs}: not run ({reason})")
                    skipped = json.loads(skip_file.read_text()) if skip_file.is_file() else {}
                    skipped[_slug(method, bs)] = reason
                    skip_file.write_text(json.dumps(skipped, indent=2) + "\n")
                    bar.update(-(-len(questions) // bs))
                    continue
                pairs.append(_Pair(method, runner, bs, questions, cfg, out, encode))
            # round robin over the methods, one batch each: a machine that slows down or speeds up during the run
            # then shifts every method alike instead of whichever ran last, so the ratios stay fair
            for pair in pairs:
                pair.warm_up(prompt_ids, cfg, bar)
            for bi in range(-(-len(questions) // bs)):
                for pair in pairs:
                    pair.run_batch(bi, questions, cfg, model, bar)
    finally:
        bar.close()
    from propd.bench.report import write_report

    write_report(out)
    log(f"results in {out} (summary.md, summary.json, answers/, plots)")
    return out


@attrs.frozen
class _Run:
    """One batch of prompts decoded by one method."""

    token_ids: list[list[int]]
    accept_lengths: list[list[int]]  # per row: tokens kept per forward pass, the prefill's first (empty: unknown)
    wall_time_s: float  # the batch
    row_wall_time_s: list[float]  # per row: from the batch's start until the row finished
    steps: list[dict]


def _preset_runner(decoder, sampling: dict):
    def run(prompts, max_new) -> _Run:
        res = decoder.generate_ids(prompts, max_new_tokens=max_new, **sampling)
        return _Run(res.token_ids, res.accept_lengths, res.wall_time_s, res.row_wall_time_s,
                    [s.as_dict() for s in res.stats])

    return run


def _baseline_runner(baseline: HFBaseline, greedy_only: bool = False):
    def run(prompts, max_new) -> _Run:
        ids, calls, wall = baseline.generate_ids(prompts, max_new)
        # transformers runs the batch in lockstep: every row takes part in every forward pass until the last ends
        return _Run(ids, [[] for _ in ids], wall, [wall] * len(ids), [{"forward_passes": calls}])

    run.unsupported = (lambda bs: "the transformers baselines run greedy only") if greedy_only else baseline.supports
    return run


class _Pair:
    """One (method, batch size): its answers and steps files, resumed batch by batch."""

    def __init__(self, method: str, runner: Callable, bs: int, questions: list[Question], cfg: BenchConfig,
                 out: Path, encode: Callable[[list[list[dict]]], list[list[int]]]):
        self.method, self.runner, self.bs, self.encode = method, runner, bs, encode
        self.slug = slug = _slug(method, bs)
        self.ans_path, self.step_path = out / "answers" / f"{slug}.jsonl", out / "steps" / f"{slug}.jsonl"
        done = _read_jsonl(self.ans_path) if cfg.resume else []
        self.done_batches = len({r["batch_index"] for r in done})
        n_done = sum(1 for r in done if r["batch_index"] < self.done_batches)
        # rewrite what is complete (drops a half-written tail), then append
        self.ans_path.write_text("".join(json.dumps(r) + "\n" for r in done[:n_done]))
        steps_done = ([r for r in _read_jsonl(self.step_path) if r["batch_index"] < self.done_batches]
                      if cfg.resume else [])
        self.step_path.write_text("".join(json.dumps(r) + "\n" for r in steps_done))
        self.batches = [list(range(s, min(s + bs, len(questions)))) for s in range(0, len(questions), bs)]

    def warm_up(self, prompt_ids: list[list[int]], cfg: BenchConfig, bar) -> None:
        bar.set_postfix_str(f"{self.method} b={self.bs} warm-up")
        if self.done_batches < len(self.batches):
            for _ in range(cfg.warmup):  # warm-up on the first batch, short and untimed
                self.runner([prompt_ids[i] for i in self.batches[0]], min(cfg.max_new_tokens, 16))
        bar.update(min(self.done_batches, len(self.batches)))

    def run_batch(self, bi: int, questions: list[Question], cfg: BenchConfig, model, bar) -> None:
        """Decode batch ``bi``, turn by turn: the rows still holding a turn j decode it together, each as the
        conversation so far."""
        if bi < self.done_batches:
            return
        rows = self.batches[bi]
        bar.set_postfix_str(f"{self.method} b={self.bs}")
        rec = {i: {k: [] for k in ("turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths",
                                   "token_ids", "forward_passes")} for i in rows}
        batch_wall, step_lines = 0.0, []
        for j in range(max(len(questions[i].turns) for i in rows)):
            active = [i for i in rows if len(questions[i].turns) > j]
            prompts = self.encode([conversation(questions[i].turns[:j + 1], rec[i]["turns"]) for i in active])
            run = self.runner(prompts, cfg.max_new_tokens)
            batch_wall += run.wall_time_s
            step_lines.append({"batch_index": bi, "turn": j, "rows": active, "steps": run.steps})
            for k, i in enumerate(active):
                r, acc = rec[i], run.accept_lengths[k]
                r["turns"].append(model.tokenizer.decode(run.token_ids[k], skip_special_tokens=True).strip())
                r["token_ids"].append(run.token_ids[k])
                r["new_tokens"].append(len(run.token_ids[k]))
                r["wall_time"].append(run.row_wall_time_s[k])
                r["accept_lengths"] += acc[1:]  # decoding steps only: acc[0] is the prefill's token
                r["decoding_steps"].append(len(acc) - 1 if acc else None)
                r["forward_passes"].append(len(acc) or None)
        lines = []
        for i in rows:
            q = questions[i]
            lines.append(json.dumps({
                "question_id": q.question_id, "category": q.category, "answer_id": f"{self.slug}-{i}",
                "model_id": f"{model.name}-{self.method}", "tstamp": time.time(), "batch_index": bi,
                "choices": [{"index": 0, **rec[i], "batch_size": self.bs, "batch_wall_time": batch_wall}],
            }))
        with self.ans_path.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        with self.step_path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(x) + "\n" for x in step_lines))
        self.done_batches = bi + 1
        bar.update(1)
