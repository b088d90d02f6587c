"""``propd bench`` end to end on the tiny model: files, Spec-Bench fields, consistent numbers, resume."""

import json

import pytest

from propd.cli import main

CATS = ["writing", "math", "qa"]


@pytest.fixture()
def questions(tmp_path):
    f = tmp_path / "question.jsonl"
    rows = [{"question_id": 100 + i, "category": CATS[i % 3], "turns": [f"question number {i}?", "and a second turn"]}
            for i in range(9)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def bench(tiny_dir, heads, questions, out, *extra):
    return main(["bench", "--model", str(tiny_dir), "--heads", str(heads), "--questions", str(questions),
                 "--per-category", "2", "--presets", "ar,medusa", "--batch-sizes", "1,2", "--max-new-tokens", "10",
                 "--warmup", "1", "--out", str(out), *extra])


def test_bench_smoke(tiny_dir, tiny_heads_dir, questions, tmp_path, capsys):
    out = tmp_path / "run"
    assert bench(tiny_dir, tiny_heads_dir, questions, out) == 0
    for name in ("run.json", "summary.json", "summary.md", "throughput_vs_batch.png", "step_time.png",
                 "accepted_per_category.png"):
        assert (out / name).is_file(), name
    answers = {}
    for slug in ("ar-b1", "ar-b2", "medusa-b1", "medusa-b2"):
        rows = [json.loads(x) for x in (out / "answers" / f"{slug}.jsonl").read_text().splitlines()]
        assert len(rows) == 6  # 2 per category x 3 categories, same prompts everywhere
        for r in rows:
            assert {"question_id", "category", "answer_id", "model_id", "choices"} <= set(r)
            c = r["choices"][0]
            assert {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"} <= set(c)
            # both turns answered, as Spec-Bench's runners do; per-turn lists
            assert len(c["turns"]) == len(c["new_tokens"]) == len(c["wall_time"]) == len(c["token_ids"]) == 2
            assert c["new_tokens"] == [len(t) for t in c["token_ids"]]
            # accept lengths cover the decoding steps only: each turn's first token comes from its prefill
            assert sum(c["accept_lengths"]) == sum(c["new_tokens"]) - 2
            assert sum(c["decoding_steps"]) == len(c["accept_lengths"])
            assert c["forward_passes"] == [d + 1 for d in c["decoding_steps"]]
            assert all(0 < w <= c["batch_wall_time"] for w in c["wall_time"])  # the row's own time
        answers[slug] = rows
    order = [r["question_id"] for r in answers["ar-b1"]]
    # methods take turns batch by batch, so drift in the machine's speed hits them alike
    when = {slug: [r["tstamp"] for r in rows] for slug, rows in answers.items()}
    assert when["ar-b1"][0] < when["medusa-b1"][0] < when["ar-b1"][1] < when["medusa-b1"][1]
    assert all([r["question_id"] for r in rows] == order for rows in answers.values())
    summary = json.loads((out / "summary.json").read_text())
    overall = {(r["preset"], r["batch_size"]): r for r in summary if r["category"] == "all"}
    for (preset, bs), r in overall.items():
        assert {"tokens_per_s", "speedup_vs_ar", "mean_accepted_tokens", "match_rate_vs_ar"} <= set(r)
        assert r["match_rate_vs_ar"] == 1.0  # fp32: every preset reproduces ar exactly
        assert r["new_tokens"] == overall[("ar", 1)]["new_tokens"]  # identical outputs, identical counts
        assert r["tokens_per_s"] > 0
    assert overall[("ar", 1)]["speedup_vs_ar"] == 1.0 and overall[("ar", 1)]["mean_accepted_tokens"] == 1.0
    assert overall[("ar", 1)]["speedup_ci90"] == [1.0, 1.0]  # ar against itself, batch by batch
    lo, hi = overall[("medusa", 2)]["speedup_ci90"]  # 3 batches of 2 prompts
    assert lo <= overall[("medusa", 2)]["speedup_vs_ar"] <= hi
    # the decode-only ratio: new tokens after each row's first over the summed step times, prefill left out
    steps = [st for line in (out / "steps" / "medusa-b2.jsonl").read_text().splitlines()
             for st in json.loads(line)["steps"]]
    m = overall[("medusa", 2)]
    assert m["decode_tokens_per_s"] == pytest.approx((m["new_tokens"] - 2 * m["prompts"])  # 2 turns, 2 prefills
                                                     / sum(st["step_time_s"] for st in steps), rel=1e-3)
    assert m["decode_speedup_vs_ar"] == pytest.approx(m["decode_tokens_per_s"] / overall[("ar", 2)][
        "decode_tokens_per_s"], rel=1e-2)
    assert overall[("ar", 1)]["decode_speedup_vs_ar"] == 1.0
    # drafting's share of the steps: recorded per step, none for ar, part of each step's time for a tree method
    assert overall[("ar", 1)]["mean_draft_ms"] == 0.0
    assert all(0 < st["draft_time_s"] < st["step_time_s"] for st in steps if st["tree_nodes"] > 1)
    assert 0 < m["mean_draft_ms"] < m["mean_step_time_ms"]
    # Spec-Bench's own figures, recomputed from its definition (evaluation/speed.py) on the answer files
    for bs in (1, 2):
        for cat in ("all", *CATS):
            sb = specbench_speed(out / "answers" / f"medusa-b{bs}.jsonl", out / "answers" / f"ar-b{bs}.jsonl", cat)
            r = next(r for r in summary if (r["preset"], r["batch_size"], r["category"]) == ("medusa", bs, cat))
            assert r["specbench_speedup"] == pytest.approx(sb["speedup"], abs=2e-3)
            assert r["specbench_tokens_per_s"] == pytest.approx(sb["tokens_per_s"], abs=2e-3)
            assert r["specbench_accept_length"] == pytest.approx(sb["accept_length"], abs=1e-4)
    assert {r["category"] for r in summary} == {"all", *CATS}
    assert "| medusa | 2 |" in (out / "summary.md").read_text()


def specbench_speed(method_file, base_file, category):
    """Spec-Bench's speed computation written from its definition: per question, its new tokens over its wall time,
    summed over turns; the mean of those rates for the method over the baseline's; the mean accept length over every
    decoding step of every question."""
    def load(path):
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        return [r for r in rows if category == "all" or r["category"] == category]

    def rate(rows):
        speeds = [sum(r["choices"][0]["new_tokens"]) / sum(r["choices"][0]["wall_time"]) for r in rows]
        return sum(speeds) / len(speeds)

    method, base = load(method_file), load(base_file)
    accepts = [x for r in method for x in r["choices"][0]["accept_lengths"]]
    return {"tokens_per_s": rate(method), "speedup": rate(method) / rate(base),
            "accept_length": sum(accepts) / len(accepts)}


def test_speedup_interval_is_a_paired_bootstrap_over_batches():
    from propd.bench.report import speedup_interval

    ar = {0: (48, 1.0), 1: (48, 2.0), 2: (48, 1.5)}  # the machine's speed changes from batch to batch ...
    twice = {i: (t, w / 2) for i, (t, w) in ar.items()}  # ... and a method twice as fast in every batch
    assert speedup_interval(twice, ar) == [2.0, 2.0]  # pairing removes the machine's drift entirely
    assert speedup_interval({0: (48, 0.5)}, ar) is None  # one shared batch: no interval
    noisy = {0: (48, 0.5), 1: (48, 2.0), 2: (48, 1.5)}  # 2x faster in one batch only
    lo, hi = speedup_interval(noisy, ar)
    point = (144 / 4.0) / (144 / 4.5)
    assert 1.0 <= lo < point < hi <= 2.0


def test_bench_resume_finishes_an_interrupted_run(tiny_dir, tiny_heads_dir, questions, tmp_path):
    out = tmp_path / "run"
    assert bench(tiny_dir, tiny_heads_dir, questions, out) == 0
    full = (out / "answers" / "medusa-b2.jsonl").read_text().splitlines()
    # simulate an interruption: one batch finished, the next half-written
    (out / "answers" / "medusa-b2.jsonl").write_text("\n".join(full[:2]) + "\n" + full[2][:30])
    assert bench(tiny_dir, tiny_heads_dir, questions, out) == 2  # refuses to overwrite without --resume
    assert bench(tiny_dir, tiny_heads_dir, questions, out, "--resume") == 0
    again = (out / "answers" / "medusa-b2.jsonl").read_text().splitlines()
    assert len(again) == 6 and again[:2] == full[:2]  # finished work kept, not redone
    assert [json.loads(x)["choices"][0]["token_ids"] for x in again] == [
        json.loads(x)["choices"][0]["token_ids"] for x in full]


def test_bench_bad_input(tiny_dir, tmp_path, capsys):
    assert main(["bench", "--questions", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"),
                 "--model", str(tiny_dir)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_transformers_baselines(tiny_dir, questions, tmp_path):
    out = tmp_path / "run"
    assert main(["bench", "--model", str(tiny_dir), "--questions", str(questions), "--limit", "3", "--presets", "ar",
                 "--baselines", "hf,hf-pld", "--batch-sizes", "1,2", "--max-new-tokens", "8", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    overall = {(r["preset"], r["batch_size"]): r for r in summary if r["category"] == "all"}
    assert overall[("hf", 1)]["match_rate_vs_ar"] == 1.0 and overall[("hf", 2)]["match_rate_vs_ar"] == 1.0
    assert overall[("hf-pld", 1)]["match_rate_vs_ar"] == 1.0
    assert ("hf-pld", 2) not in overall
    assert "hf-pld-b2 (transformers' prompt lookup decoding supports batch size 1 only)" in (
        out / "summary.md").read_text()


def test_bench_variants_run_as_their_own_methods(tiny_dir, tiny_heads_dir, questions, tmp_path):
    out = tmp_path / "run"
    assert bench(tiny_dir, tiny_heads_dir, questions, out, "--variant",
                 "l1-k4=propd-prune-only;pruner=early-topk:layer=1,k=4", "--variant",
                 "dyn-small=propd;sizer=propd-dynamic:sizes=[1,2,4],explore=[1,4];pruner=none") == 0
    summary = json.loads((out / "summary.json").read_text())
    overall = {(r["preset"], r["batch_size"]): r for r in summary if r["category"] == "all"}
    for bs in (1, 2):
        assert overall[("l1-k4", bs)]["match_rate_vs_ar"] == 1.0 == overall[("dyn-small", bs)]["match_rate_vs_ar"]
        assert overall[("l1-k4", bs)]["mean_nodes_after_pruning"] < overall[("l1-k4", bs)]["mean_tree_nodes"] == 64
        assert overall[("dyn-small", bs)]["mean_tree_nodes"] <= 4
    assert (out / "ablation.png").is_file() is False  # medusa alone is no ablation
    assert bench(tiny_dir, tiny_heads_dir, questions, tmp_path / "dup", "--variant", "ar=medusa") == 2
    assert bench(tiny_dir, tiny_heads_dir, questions, tmp_path / "bad", "--variant", "x=medusa;shape=chain") == 2


def test_results_suite_writes_tables_and_updates_docs(tiny_dir, tiny_heads_dir, questions, tmp_path):
    from results import BEGIN, END, SuiteConfig, run_suite  # tools/results.py

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text(f"# Results\n\nprose stays\n\n{BEGIN}\nold numbers\n{END}\n\nmore prose\n")
    cfg = SuiteConfig(questions=str(questions), out=str(tmp_path / "res"), docs=str(docs), per_category=1,
                      max_new_tokens=6, batch_sizes=(1, 2), bf16_limit=2, bf16_batch_sizes=(1,), table2_tokens=6,
                      model=str(tiny_dir), heads=str(tiny_heads_dir), table2_layers=(1, 2), table2_topk=(4, 16))
    run_suite(cfg)
    doc = (docs / "results.md").read_text()
    assert "old numbers" not in doc and "prose stays" in doc and "more prose" in doc
    assert "cf. ProPD Table 1 and Table 3" in doc and "cf. ProPD Table 2" in doc
    assert "| propd | " in doc and "| 2 | " in doc  # ablation rows and the pruning grid's layer 2 row
    assert "90% paired bootstrap interval" in doc
    assert (docs / "img" / "results" / "fp32-ablation.png").is_file()
    assert (docs / "img" / "results" / "fp32-throughput_vs_batch.png").is_file()
    fp32 = json.loads((tmp_path / "res" / "fp32" / "summary.json").read_text())
    assert {r["preset"] for r in fp32} >= {"ar", "bpd", "medusa", "propd", "propd-prune-only", "propd-dynamic-only",
                                           "hf", "hf-pld"}
    assert all(r["match_rate_vs_ar"] == 1.0 for r in fp32 if r["category"] == "all")
    before = (tmp_path / "res" / "tables.md").read_text()
    run_suite(cfg)  # resumable: a second call redoes nothing and regenerates the same tables
    assert (tmp_path / "res" / "tables.md").read_text() == before


def test_tune_uses_only_held_out_training_prompts_and_fills_its_doc_section(tiny_dir, tiny_heads_dir, tmp_path):
    from propd.bench.tune import TuneConfig, run_tune
    from propd.training.data import training_prompts
    from tune_docs import BEGIN, END, publish  # tools/tune_docs.py

    data = tmp_path / "train"
    for src in ("eagle_alpaca", "vicuna_bench"):
        (data / src).mkdir(parents=True)
        rows = [{"question_id": i, "turns": [f"{src} question {i}?"]} for i in range(6)]
        (data / src / "question.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "propd.md").write_text(f"# ProPD\n\nprose stays\n\n{BEGIN}\nold\n{END}\n")
    cfg = TuneConfig(out=str(tmp_path / "tune"), data=str(data), skip=8, per_source=2,
                     max_new_tokens=6, layers=(1, 2), topk=(4, 16), alphas=(0.05, 0.2), lams=(0.05,),
                     min_nodes=(2,), prune_batch_size=2, model=str(tiny_dir), heads=str(tiny_heads_dir))
    run_tune(cfg)
    publish(tmp_path / "tune", docs)
    asked = [json.loads(line) for line in (tmp_path / "tune" / "question.jsonl").read_text().splitlines()]
    trained = set(training_prompts(data, 8))
    assert len(asked) == 4 and not {q["turns"][0] for q in asked} & trained  # the 4 prompts heads never saw
    prune = json.loads((tmp_path / "tune" / "prune" / "summary.json").read_text())
    sizer = json.loads((tmp_path / "tune" / "sizer" / "summary.json").read_text())
    assert {r["preset"] for r in prune} == {"ar", "medusa", "l1-k4", "l1-k16", "l2-k4", "l2-k16"}
    assert {r["preset"] for r in sizer} == {"ar", "propd", "propd-dynamic-only", "a0.05-l0.05", "a0.2-l0.05",
                                            "S-small", "m2"}
    assert {r["batch_size"] for r in prune} == {2} and {r["batch_size"] for r in sizer} == {1}
    assert all(r["match_rate_vs_ar"] == 1.0 for r in prune + sizer if r["category"] == "all")
    doc = (docs / "propd.md").read_text()
    assert "old" not in doc and "prose stays" in doc and "| 2 | " in doc and "| 0.2 | " in doc
    assert doc.count("Fastest cell: ") == 2
    assert "| 2 | " in doc.split("min_nodes")[-1] and "| never (`propd-dynamic-only`) | " in doc


def test_tune_rejects_unknown_runs_and_too_few_prompts(tiny_dir, tmp_path, capsys):
    assert main(["tune", "--only", "grid", "--out", str(tmp_path / "t")]) == 2
    assert "unknown run(s) ['grid']" in capsys.readouterr().err
    data = tmp_path / "train" / "eagle_alpaca"
    data.mkdir(parents=True)
    (data / "question.jsonl").write_text(json.dumps({"question_id": 1, "turns": ["hi"]}) + "\n")
    assert main(["tune", "--data", str(data.parent), "--model", str(tiny_dir), "--out", str(tmp_path / "t")]) == 2
    assert "no held-out training prompts" in capsys.readouterr().err


def test_variant_sets_the_draft_vocabulary():
    from propd import PropdError
    from propd.presets import Method

    assert Method.parse("m0=medusa;draft_vocab=0").decoder_kwargs() == {"preset": "medusa", "draft_vocab": 0}
    with pytest.raises(PropdError, match="whole number"):
        Method.parse("m=medusa;draft_vocab=lots")


def test_second_turns_continue_the_conversation(tiny_dir, questions, tmp_path):
    """Turn 2 is asked after turn 1 and the model's answer to it, as Spec-Bench's runners ask MT-bench."""
    from propd import Decoder
    from propd.chat import conversation
    from propd.models.loading import load_model

    out = tmp_path / "run"
    assert main(["bench", "--model", str(tiny_dir), "--questions", str(questions), "--limit", "2", "--presets", "ar",
                 "--max-new-tokens", "6", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "answers" / "ar-b1.jsonl").read_text().splitlines()]
    dec = Decoder(load_model(str(tiny_dir)), preset="ar")
    qs = {q["question_id"]: q for q in map(json.loads, questions.read_text().splitlines())}
    for r in rows:
        c, q = r["choices"][0], qs[r["question_id"]]
        second = dec.generate([conversation(q["turns"], c["turns"][:1])], max_new_tokens=6).token_ids[0]
        assert c["token_ids"][1] == second
    flat = main(["bench", "--model", str(tiny_dir), "--questions", str(questions), "--limit", "2", "--presets", "ar",
                 "--max-new-tokens", "6", "--turns", "first", "--out", str(tmp_path / "first")])
    assert flat == 0
    first = [json.loads(x) for x in (tmp_path / "first" / "answers" / "ar-b1.jsonl").read_text().splitlines()]
    assert all(len(r["choices"][0]["turns"]) == 1 for r in first)
