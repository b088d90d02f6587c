"""The ``propd`` command line. Bad input exits with code 2 and a one-line ``propd: error: ...`` message."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import attrs

from propd.errors import PropdError
from propd.files import read_text_file


def _read_prompts(args: argparse.Namespace) -> list[list[str]]:
    """Each prompt as its list of user turns (one turn, except Spec-Bench / MT-bench questions with several)."""
    prompts: list[list[str]] = [[p] for p in args.prompt]
    if args.prompts_file:
        path = Path(args.prompts_file)
        text = read_text_file(path, "prompts file")
        if path.suffix == ".jsonl":
            for n, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PropdError(f"{path}:{n}: not JSON ({exc.msg})") from None
                if isinstance(obj, str):
                    prompts.append([obj])
                elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                    prompts.append([obj["prompt"]])
                elif (isinstance(obj, dict) and isinstance(obj.get("turns"), list) and obj["turns"]
                      and all(isinstance(t, str) for t in obj["turns"])):
                    prompts.append(list(obj["turns"]))  # Spec-Bench / MT-bench: every turn, as one conversation
                else:
                    raise PropdError(f"{path}:{n}: expected a string, or an object with 'prompt' or 'turns'")
        else:
            prompts.extend([line] for line in text.splitlines() if line.strip())
    if not prompts and not sys.stdin.isatty():
        prompts.extend([line] for line in sys.stdin.read().splitlines() if line.strip())
    if not prompts:
        raise PropdError("no prompts given: pass PROMPT arguments, --prompts-file, or lines on stdin")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    prompts = _read_prompts(args)
    if args.max_new_tokens <= 0:
        raise PropdError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise PropdError(f"--batch-size must be positive, got {args.batch_size}")
    threads = _threads_arg(args.threads)
    from propd.decoder import Decoder, stop_strings

    if args.stop is not None:
        stop_strings(args.stop)  # fail fast, before loading anything
    from propd.models.loading import load_model
    from propd.presets import check_preset, parse_component
    from propd.sampling import SamplingParams

    check_preset(args.preset)  # fail fast, before loading anything
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    overrides = {role: parse_component(getattr(args, role)) for role in ("sizer", "proposer", "verifier")
                 if getattr(args, role)}
    if args.pruner:
        overrides["pruners"] = [parse_component(p) for p in args.pruner if p != "none"]
    model = load_model(args.model, device=args.device, dtype=args.dtype, heads=args.heads)
    decoder = Decoder(model, preset=args.preset, draft_vocab=args.draft_vocab, threads=threads,
                      **overrides)
    from propd.chat import conversation

    answers: list[list[str]] = [[] for _ in prompts]
    last: dict[int, tuple] = {}  # prompt -> (result, row) of its last turn
    total = steps = 0
    wall = 0.0
    stream = len(prompts) == 1 and not args.json  # one prompt: its text is printed as it is generated

    def show(_: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    for j in range(max(len(p) for p in prompts)):  # turn j of every prompt that has one, asked as one conversation
        active = [i for i, p in enumerate(prompts) if len(p) > j]
        msgs = [conversation(prompts[i][: j + 1], answers[i]) if j else prompts[i][0] for i in active]
        if stream and len(prompts[0]) > 1:
            print(f"--- [0] turn {j + 1} {prompts[0][j][:60]}", flush=True)
        res = decoder.generate(msgs, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                               chat=not args.no_chat, progress=not args.json, raw_special=args.raw_special,
                               on_text=show if stream else None, stop=args.stop or (), **attrs.asdict(sampling))
        if stream:
            print(flush=True)
        for k, i in enumerate(active):
            answers[i].append(res.texts[k])
            last[i] = (res, k)
        total, steps, wall = total + sum(res.new_tokens), steps + sum(res.steps), wall + res.wall_time_s
    preset = decoder.preset if args.preset == decoder.preset else f"{args.preset} -> {decoder.preset}"
    if args.json:
        for i in range(len(prompts)):
            res, k = last[i]
            row = {"index": i, "text": answers[i][-1], "token_ids": res.token_ids[k], "new_tokens": res.new_tokens[k],
                   "steps": res.steps[k], "mean_accepted_tokens": round(res.mean_accepted_tokens(k), 4),
                   "wall_time_s": round(res.row_wall_time_s[k], 4), "preset": decoder.preset, "model": model.name,
                   "step_stats": res.row_stats(k)}
            if len(prompts[i]) > 1:
                row["turns"] = answers[i]  # every answer; the other fields describe the last turn
            print(json.dumps(row, ensure_ascii=False))
    elif not stream:
        for i, turns in enumerate(prompts):
            for j, text in enumerate(answers[i]):
                if len(prompts) > 1 or len(turns) > 1:
                    print(f"--- [{i}]{f' turn {j + 1}' if len(turns) > 1 else ''} {turns[j][:60]}")
                print(text)
    print(f"propd: {total} tokens in {wall:.2f}s ({total / max(wall, 1e-9):.1f} tok/s), "
          f"{total / max(steps, 1):.2f} tokens per forward pass per prompt (ar: 1.00), preset {preset}, "
          f"weights {model.weights}",
          file=sys.stderr)
    return 0


def _threads_arg(value: str) -> str | int:
    """``--threads``: auto or a positive whole number (else a one-line error, exit 2)."""
    if value == "auto":
        return value
    if not value.strip().isdigit() or int(value) < 1:
        raise PropdError(f"--threads must be auto or a positive whole number, got {value!r}")
    return int(value)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default): greedy; above 0: sample, with the base model's distribution kept exactly")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1: all)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; prompt i draws from (seed, i)")


def _csv(value: str | None, cast=str) -> tuple | None:
    if value is None:
        return None
    try:
        return tuple(cast(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        raise PropdError(f"bad list {value!r}: expected comma-separated values") from None


def cmd_bench(args: argparse.Namespace) -> int:
    from propd.bench.runner import BenchConfig, run_bench

    if args.per_category is not None and args.limit is not None:
        raise PropdError("use --per-category or --limit, not both")
    cfg = BenchConfig(
        questions=args.questions, out=args.out, presets=_csv(args.presets) or (), baselines=_csv(args.baselines) or (),
        batch_sizes=_csv(args.batch_sizes, int), categories=_csv(args.categories), per_category=args.per_category,
        limit=args.limit, turns=args.turns, max_new_tokens=args.max_new_tokens, model=args.model, heads=args.heads,
        variants=tuple(args.variant or ()),
        dtype=args.dtype, device=args.device, warmup=args.warmup, resume=args.resume, chat=not args.no_chat,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
    )
    if not cfg.presets and not cfg.baselines and not cfg.variants:
        raise PropdError("nothing to run: give --presets, --variant and/or --baselines")
    run_bench(cfg)
    print((Path(args.out) / "summary.md").read_text())
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from propd.bench.tune import TuneConfig, run_tune, runs

    only = {"only": _csv(args.only)} if args.only else {}
    cfg = TuneConfig(out=args.out, data=args.data, skip=args.skip, per_source=args.per_source,
                     model=args.model, heads=args.heads, device=args.device, **only)
    runs(cfg, "")  # unknown run names first: they need no files
    out = run_tune(cfg)
    print((out / "tuning.md").read_text())
    return 0


def cmd_train_heads(args: argparse.Namespace) -> int:
    from propd.training.data import DEFAULT_MAX_PROMPTS
    from propd.training.trainer import TrainConfig, train_heads

    eagle_only = {"--follow-ups": args.follow_ups, "--tasks": args.tasks, "--passages": args.passages,
                  "--self-prompts": args.self_prompts,
                  "--ttt-steps": args.ttt_steps is not None, "--weight-decay": args.weight_decay is not None,
                  "--val-each-epoch": args.val_each_epoch, "--gen-dtype": args.gen_dtype is not None,
                  "--train-dtype": args.train_dtype is not None, "--p-target": args.p_target is not None}
    for flag, given in eagle_only.items():
        if args.kind != "eagle" and given:
            raise PropdError(f"{flag} is for --kind eagle")
    if args.kind == "eagle":
        if args.draft_vocab_only:
            raise PropdError("--draft-vocab-only is for Medusa heads; an EAGLE run writes its draft_vocab.json itself")
        return _train_eagle(args)
    cfg = TrainConfig(model=args.model, out=args.out, num_heads=args.num_heads, head_layers=args.head_layers,
                      early_layers=_csv(args.early_layers, int) or (),
                      max_prompts=args.max_prompts if args.max_prompts is not None else DEFAULT_MAX_PROMPTS,
                      max_new_tokens=args.max_new_tokens or 96, epochs=args.epochs or 2, device=args.device,
                      seed=args.seed, data=args.data)
    report = train_heads(cfg, draft_vocab_only=args.draft_vocab_only)
    if args.draft_vocab_only:
        dv = report["draft_vocab"]
        cover = ", ".join(f"{n}: {c:.3f}" for n, c in dv["val_coverage"].items())
        print(f"draft vocabulary: {dv['tokens']} tokens; share of validation answer tokens covered by the top N: "
              f"{cover}")
        return 0
    for h in report["medusa_heads"]:
        print(f"medusa head {h['head']} ({h['predicts']}): top1 {h['top1']:.3f} top5 {h['top5']:.3f} "
              f"top10 {h['top10']:.3f} top50 {h['top50']:.3f}")
    for e in report["early_layers"]:
        print(f"early layer {e['layer']}: top1 {e['top1']:.3f} top10 {e['top10']:.3f} top50 {e['top50']:.3f} "
              f"top200 {e['top200']:.3f}")
    return 0


def _train_eagle(args: argparse.Namespace) -> int:
    from propd.training.eagle import EagleTrainConfig, train_eagle

    names = ("max_prompts", "max_new_tokens", "epochs", "follow_ups", "tasks", "passages", "ttt_steps", "self_prompts",
             "weight_decay", "gen_dtype", "train_dtype", "p_target")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    given["val_each_epoch"] = args.val_each_epoch
    cfg = EagleTrainConfig(model=args.model, out=args.out, device=args.device, seed=args.seed, data=args.data, **given)
    report = train_eagle(cfg)
    v = report["validation"]
    print(f"EAGLE drafter: first guess top1 {v['top1']:.3f} top3 {v['top3']:.3f} top10 {v['top10']:.3f} on "
          f"{v['positions']} validation positions; {report['wall_time_s']:.0f}s")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from propd.models.loading import KNOWN_MODELS, fetch_known_model

    if args.action == "list":
        for m in KNOWN_MODELS.values():
            print(f"{m.name}\t{m.description}")
        return 0
    if args.name not in KNOWN_MODELS:
        raise PropdError(f"unknown model {args.name!r} (known: {', '.join(KNOWN_MODELS)})")
    print(fetch_known_model(args.name))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from propd.presets import all_presets

    print(f"{'auto':10s} the default: on a GPU propd with Medusa and early heads, propd-dynamic-only with Medusa "
          f"heads alone; ar without heads and on a CPU\n")
    for p in all_presets().values():
        parts = [f"sizer={p.sizer[0]}{p.sizer[1] or ''}"]
        if p.proposer:
            parts.append(f"proposer={p.proposer[0]}")
        parts += [f"pruner={n}{o or ''}" for n, o in p.pruners]
        parts.append(f"verifier={p.verifier[0]}")
        print(f"{p.name:10s} {p.description}\n{'':10s} {' '.join(parts)}")
    return 0


def cmd_components(args: argparse.Namespace) -> int:
    import attrs

    from propd.plugins import Registry

    for c in Registry().all():
        opts = ""
        if c.config_cls is not None:
            opts = " [" + ", ".join(f"{f.name}={f.default!r}" for f in attrs.fields(c.config_cls)) + "]"
        print(f"{c.role:9s} {c.name:12s} {c.description}{opts}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from propd.models.loading import DEFAULT_MODEL, DTYPE_CHOICES
    from propd.training.data import DEFAULT_MAX_PROMPTS

    parser = argparse.ArgumentParser(prog="propd", description="Lossless parallel decoding for Llama-family LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for prompts")
    g.add_argument("prompt", nargs="*", help="prompt text (also --prompts-file, or one prompt per stdin line)")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"known name, HF directory, .gguf file or hub id "
                                                          f"(default: {DEFAULT_MODEL})")
    g.add_argument("--heads", help="Medusa heads checkpoint (directory or file; an eagle/ folder beside them holds an "
                                   "EAGLE drafter) or an EAGLE drafter directory; the default model uses its shipped "
                                   "heads and drafter unless this is given ('none': none)")
    g.add_argument("--preset", default="auto", help="strategy combination (see `propd presets`; default: auto, "
                                                    "the fastest lossless one the model supports; ar: plain "
                                                    "greedy decoding)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="end a prompt's answer where its text first contains TEXT, cut before it (repeat for several)")
    _sampling_args(g)
    g.add_argument("--batch-size", type=int, default=None, help="prompts decoded together (default: all)")
    g.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES),
                   help="auto (default): gguf where it applies, else float32; gguf: a GGUF model's Q4_1/Q8_0 blocks "
                        "kept as they are (CPU with AVX2), with float32's output; gguf-q8: the same blocks with "
                        "llama.cpp's 8-bit activations (faster, above all for trees; its own output); float32, "
                        "bfloat16, float16")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    g.add_argument("--threads", default="auto",
                   help="CPU threads of decoding (steps and prefill): auto (default: the fastest, measured as it "
                        "runs, up to torch's count; fewer can win on a busy machine) or a number")
    g.add_argument("--no-chat", action="store_true", help="send the raw text, not the chat template")
    g.add_argument("--raw-special", action="store_true",
                   help="let marker text in prompts (e.g. <|im_end|>) become the tokenizer's special tokens; by "
                        "default it stays plain text, so a prompt cannot close its own turn")
    g.add_argument("--prompts-file", help=".jsonl (strings, {'prompt'}, or Spec-Bench {'turns'}: every turn answered "
                        "in one conversation) or .txt (a line each)")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout, with per-step stats")
    for role in ("sizer", "proposer", "verifier"):
        g.add_argument(f"--{role}", help=f"replace the preset's {role}: NAME or NAME:key=value,... "
                                         "(see `propd components`)")
    g.add_argument("--pruner", action="append", help="replace the preset's pruners (repeat to stack; 'none': no "
                                                     "pruning): NAME or NAME:key=value,...")
    g.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="Medusa heads guess among the N most frequent tokens of their draft_vocab.json (default: "
                        "all it lists; 0: the whole vocabulary). Never changes the output, only the speed")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="benchmark presets and transformers baselines on Spec-Bench-format questions")
    b.add_argument("--questions", required=True, help="question.jsonl in Spec-Bench format")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--presets", default="ar", help="comma-separated presets (default: ar)")
    b.add_argument("--baselines", default=None, help="comma-separated: hf, hf-pld")
    b.add_argument("--variant", action="append", help="a preset with roles replaced, run as its own method: "
                                                      "LABEL=PRESET;ROLE=NAME:key=value,...  (repeatable), e.g. "
                                                      "'l2-k100=propd-prune-only;pruner=early-topk:layer=2,k=100'; "
                                                      "draft_vocab=N sets the heads' draft vocabulary")
    b.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (default: 1)")
    b.add_argument("--categories", default=None, help="comma-separated categories (default: all)")
    b.add_argument("--per-category", type=int, default=None, help="deterministic sample of N questions per category")
    b.add_argument("--limit", type=int, default=None, help="first N questions")
    b.add_argument("--turns", default="all", choices=["first", "all"],
                   help="all (default, as Spec-Bench): every turn of a question, asked as one conversation; "
                        "first: the first turn only")
    b.add_argument("--max-new-tokens", type=int, default=128)
    _sampling_args(b)
    b.add_argument("--model", default=DEFAULT_MODEL)
    b.add_argument("--heads", default=None)
    b.add_argument("--dtype", default="float32", choices=list(DTYPE_CHOICES),
                   help="as for generate (default: float32, as docs/results.md measured)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per (method, batch size)")
    b.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    b.add_argument("--no-chat", action="store_true")
    b.set_defaults(func=cmd_bench)

    u = sub.add_parser("tune", help="choose ProPD's pruning layer/top-k and sizer rates on held-out training prompts")
    u.add_argument("--out", default="out/tune", help="bench directories (resumable; default: out/tune)")
    u.add_argument("--data", default=None, help="training prompts folder (default: $PROPD_TRAIN_DATA, else the nearest "
                        "shared/data/train at or above the working directory)")
    u.add_argument("--skip", type=int, default=DEFAULT_MAX_PROMPTS,
                   help="leading training prompts to leave out: those train-heads distilled from "
                        f"(default: {DEFAULT_MAX_PROMPTS})")
    u.add_argument("--per-source", type=int, default=6, help="held-out prompts per training source (default: 6)")
    u.add_argument("--only", default=None, help="comma-separated subset of: prune, sizer")
    u.add_argument("--model", default=DEFAULT_MODEL)
    u.add_argument("--heads", default=None)
    u.add_argument("--device", default="cpu")
    u.set_defaults(func=cmd_tune)

    t = sub.add_parser("train-heads", help="self-distil Medusa heads and early-exit heads, or an EAGLE drafter, for "
                                           "a model")
    t.add_argument("--kind", choices=("medusa", "eagle"), default="medusa",
                   help="medusa: Medusa heads and early-exit heads (default); eagle: an EAGLE feature drafter "
                        "(every training prompt, 128 new tokens and 12 epochs unless given)")
    t.add_argument("--model", default=DEFAULT_MODEL)
    t.add_argument("--out", required=True, help="output directory (heads, report.json; work/ holds resumable state)")
    t.add_argument("--num-heads", type=int, default=4)
    t.add_argument("--head-layers", type=int, default=1, help="ResBlocks per Medusa head (default: 1, as Medusa-1)")
    t.add_argument("--early-layers", default="1,2,3,4,5,6", help="comma-separated layer counts n (1..L-1)")
    t.add_argument("--max-prompts", type=int, default=None,
                   help=f"training prompts (default: {DEFAULT_MAX_PROMPTS} for medusa, all for eagle)")
    t.add_argument("--max-new-tokens", type=int, default=None, help="answer length (default: 96 medusa, 128 eagle)")
    t.add_argument("--epochs", type=int, default=None, help="default: 2 medusa, 12 eagle")
    t.add_argument("--follow-ups", type=int, default=None, metavar="K",
                   help="eagle: also train on K second turns per prompt (a generic request about the model's first "
                        "answer, then its answer; 0-8, default 0)")
    t.add_argument("--tasks", type=int, default=None, metavar="K",
                   help="eagle: also train on K requests per prompt that hand the model its first answer as a text to "
                        "summarize, translate, answer questions about, ... (0-8, default 0)")
    t.add_argument("--passages", type=int, default=None, metavar="K",
                   help="eagle: also train on K requests per prompt to summarize, translate, ... a passage of other "
                        "training prompts' (human-written) text, with the model's answers (0-8, default 0)")
    t.add_argument("--self-prompts", type=int, default=None, metavar="N",
                   help="eagle: also train on N user requests the model writes itself (sampled after its chat "
                        "template's user-turn start, as Magpie), with its answers (default 0)")
    t.add_argument("--ttt-steps", type=int, default=None, metavar="S",
                   help="eagle: draft steps unrolled in training (EAGLE-3's training-time test: step s reads the "
                        "drafter's own step s-1 feature; 1-4, default 1)")
    t.add_argument("--weight-decay", type=float, default=None, metavar="W",
                   help="eagle: AdamW's weight decay (default 0)")
    t.add_argument("--p-target", choices=("greedy", "soft"), default=None,
                   help="eagle: the token loss's target: the base model's greedy token (default) or its whole "
                        "next-token distribution (soft, as EAGLE's training)")
    t.add_argument("--val-each-epoch", action="store_true",
                   help="eagle: measure the validation accuracy after every epoch (printed, and in report.json's "
                        "history; seconds each on the shipped recipe's data)")
    t.add_argument("--gen-dtype", choices=("float32", "bfloat16"), default=None,
                   help="eagle: the base model's dtype for the training answers and their features (default "
                        "float32; bfloat16 is about 1.9x faster on CPUs with AVX512-BF16 or AMX)")
    t.add_argument("--train-dtype", choices=("float32", "bfloat16"), default=None,
                   help="eagle: bfloat16 autocasts the drafter's products in training, weights kept in float32 "
                        "(default float32; about 1.6x faster on CPUs with AVX512-BF16 or AMX)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data", default=None, help="training prompts folder (default: $PROPD_TRAIN_DATA, else the nearest "
                        "shared/data/train at or above the working directory)")
    t.add_argument("--draft-vocab-only", action="store_true",
                   help="only (re)write OUT/draft_vocab.json, the tokens the heads may guess, from the answers to "
                        "the same training prompts (for heads trained before it existed, or by others)")
    t.set_defaults(func=cmd_train_heads)

    m = sub.add_parser("models", help="fetch or list known models")
    msub = m.add_subparsers(dest="action", required=True)
    f = msub.add_parser("fetch", help="fetch and convert a known model; print its HF directory")
    f.add_argument("name")
    msub.add_parser("list", help="known model names")
    m.set_defaults(func=cmd_models)

    sub.add_parser("presets", help="list presets").set_defaults(func=cmd_presets)
    sub.add_parser("components", help="list registered components (built-in and plugins)").set_defaults(
        func=cmd_components)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PropdError as exc:
        print(f"propd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("propd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
