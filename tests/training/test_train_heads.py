"""The head-training loop on the tiny model: loss goes down, the checkpoint round-trips, the report has its shape."""

import json

import attrs
import pytest
import torch

from propd import Decoder, PropdError, load_model
from propd.cli import main
from propd.training.data import training_prompts
from propd.training.trainer import EARLY_TOPK, MEDUSA_TOPK, TrainConfig, train_heads


@pytest.fixture()
def train_dir(tmp_path):
    d = tmp_path / "train"
    (d / "eagle_alpaca").mkdir(parents=True)
    rows = [{"question_id": i, "turns": [f"tell me about item {i} and {i * 7}"]} for i in range(24)]
    (d / "eagle_alpaca" / "question.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "awesome_chatgpt_prompts").mkdir()
    (d / "awesome_chatgpt_prompts" / "prompts.csv").write_text(
        'act,prompt,for_devs,type,contributor\nA,"act as a poet",FALSE,TEXT,x\nB,"{""json"": 1}",FALSE,JSON,y\n')
    return d


def test_prompts_skip_non_text_rows_and_refuse_bench(train_dir, tmp_path):
    prompts = training_prompts(train_dir)
    assert "act as a poet" in prompts and not any("json" in p for p in prompts) and len(prompts) == 25
    bench = tmp_path / "bench" / "spec"
    bench.mkdir(parents=True)
    with pytest.raises(PropdError, match="never used for training"):
        training_prompts(bench)


def test_train_heads_on_tiny_model(tiny_dir, train_dir, tmp_path):
    out = tmp_path / "heads"
    cfg = TrainConfig(model=str(tiny_dir), out=str(out), num_heads=2, early_layers=(1, 2), max_prompts=None,
                      max_new_tokens=24, epochs=4, data=str(train_dir), train_batch_tokens=32, lr=3e-3)
    report = train_heads(cfg, log=lambda m: None)
    losses = [h["train_loss"] for h in report["history"]]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.9  # the loss goes down
    assert [h["head"] for h in report["medusa_heads"]] == [0, 1]
    assert [e["layer"] for e in report["early_layers"]] == [1, 2]
    for h in report["medusa_heads"]:
        acc = [h[f"top{k}"] for k in MEDUSA_TOPK]
        assert acc == sorted(acc) and 0 <= acc[0] <= acc[-1] <= 1
    for e in report["early_layers"]:
        acc = [e[f"top{k}"] for k in EARLY_TOPK]
        assert acc == sorted(acc) and acc[-1] > acc[0]
    assert json.loads((out / "report.json").read_text())["val_positions"] == report["val_positions"] > 0
    assert report["threads"] == torch.get_num_threads() and report["torch"] == torch.__version__
    assert set(report["stage_wall_time_s"]) == {"answers", "features", "training"}
    dv = report["draft_vocab"]  # ranked from the training answers, measured on the validation answers
    cover = list(dv["val_coverage"].values())
    assert dv["tokens"] > 0 and dv["val_tokens"] > 0 and cover == sorted(cover) and 0 < cover[-1] <= 1
    # the checkpoint round-trips: loaded heads (and early heads beside them) drive the medusa preset losslessly
    model = load_model(str(tiny_dir), heads=out)
    assert model.heads.num_heads == 2 and sorted(model.early_heads) == [1, 2]
    assert model.heads.draft_size() == dv["tokens"]
    ids = [[5, 6, 7, 8], [9, 10]]
    ar = Decoder(model, preset="ar").generate_ids(ids, max_new_tokens=12).token_ids
    for n in (None, 0):  # guessing from the draft vocabulary, and from the whole vocabulary
        assert Decoder(model, preset="medusa", sizer=("static", {"tree": [(0,), (1,), (0, 0)]}),
                       draft_vocab=n).generate_ids(ids, max_new_tokens=12).token_ids == ar
    # a rerun resumes from the cached answers, features and last checkpoint: same report, no retraining
    again = train_heads(cfg, log=lambda m: None)
    assert again["medusa_heads"] == report["medusa_heads"] and again["history"] == report["history"]
    # --draft-vocab-only rewrites the draft vocabulary alone, the same one, and keeps the rest of the report
    first = (out / "draft_vocab.json").read_text()
    (out / "draft_vocab.json").unlink()
    only = train_heads(cfg, log=lambda m: None, draft_vocab_only=True)
    assert (out / "draft_vocab.json").read_text() == first and only["draft_vocab"] == dv
    assert json.loads((out / "report.json").read_text())["medusa_heads"] == report["medusa_heads"]


def test_train_heads_cli_rejects_bad_layers(tiny_dir, train_dir, tmp_path, capsys):
    code = main(["train-heads", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--early-layers", "9",
                 "--data", str(train_dir)])
    assert code == 2 and "out of range" in capsys.readouterr().err


def test_more_prompts_extend_the_cached_answers_and_features(tiny_dir, train_dir, tmp_path):
    """Raising --max-prompts reuses the cached answers and hidden states; the result equals a run from scratch."""
    common = dict(model=str(tiny_dir), num_heads=2, early_layers=(1, 2), max_new_tokens=8, epochs=1,
                  data=str(train_dir), train_batch_tokens=64)
    grown = tmp_path / "grown"
    logs = []
    train_heads(TrainConfig(out=str(grown), max_prompts=16, **common), log=lambda m: None)
    train_heads(TrainConfig(out=str(grown), max_prompts=None, **common), log=logs.append)
    assert any("computing hidden states for 9 answers (once; 16 cached)" in m for m in logs)
    scratch = tmp_path / "scratch"
    train_heads(TrainConfig(out=str(scratch), max_prompts=None, **common), log=lambda m: None)
    assert (grown / "work" / "answers.jsonl").read_text() == (scratch / "work" / "answers.jsonl").read_text()
    a, b = (torch.load(d / "work" / "features.pt", weights_only=False) for d in (grown, scratch))
    assert a["key"] == b["key"] and a["key"]["n"] == 25
    for name in ("final", "targets", "seq"):
        assert torch.equal(a[name], b[name]), name
    assert all(torch.equal(a["early"][n], b["early"][n]) for n in (1, 2))


def test_head_layers_train_deeper_heads_that_load_back(tiny_dir, train_dir, tmp_path):
    out = tmp_path / "deep"
    cfg = TrainConfig(model=str(tiny_dir), out=str(out), num_heads=2, head_layers=2, early_layers=(1,),
                      max_prompts=8, max_new_tokens=8, epochs=1, data=str(train_dir), train_batch_tokens=64)
    assert train_heads(cfg, log=lambda m: None)["config"]["head_layers"] == 2
    assert json.loads((out / "config.json").read_text())["medusa_num_layers"] == 2
    model = load_model(str(tiny_dir), heads=out)
    assert model.heads.num_layers == 2
    ids = [[5, 6, 7, 8], [9, 10]]
    ar = Decoder(model, preset="ar").generate_ids(ids, max_new_tokens=10).token_ids
    assert Decoder(model, preset="medusa", sizer=("static", {"tree": [(0,), (1,), (0, 0)]})).generate_ids(
        ids, max_new_tokens=10).token_ids == ar
    code = main(["train-heads", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--head-layers", "0",
                 "--data", str(train_dir)])
    assert code == 2


def test_a_run_stopped_while_saving_keeps_the_last_whole_checkpoint(tiny_dir, train_dir, tmp_path, monkeypatch):
    """Epoch 2's save is cut off half-written (as by Ctrl-C): epoch 1's checkpoint still loads, and a rerun resumes
    (the cached features go through the same write-then-rename)."""
    import propd.training.trainer as trainer

    cfg = TrainConfig(model=str(tiny_dir), out=str(tmp_path / "h"), num_heads=2, early_layers=(1,), max_prompts=8,
                      max_new_tokens=8, epochs=2, data=str(train_dir), train_batch_tokens=64)
    real_save, saves = torch.save, []

    def save_then_stop(obj, path):
        saves.append(obj.get("epoch"))  # None: the cached features
        if obj.get("epoch") == 2:
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(trainer.torch, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_heads(cfg, log=lambda m: None)
    monkeypatch.setattr(trainer.torch, "save", real_save)
    assert saves == [None, 1, 2]
    assert torch.load(tmp_path / "h" / "work" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    logs = []
    report = train_heads(cfg, log=logs.append)
    assert "resuming after epoch 1" in logs and len(report["history"]) == 2


def test_train_eagle_on_tiny_model(tiny_dir, train_dir, tmp_path):
    """The EAGLE drafter learns the tiny model's greedy answers (validation accuracy well above chance), the run
    resumes from its checkpoint with the same result, and the saved drafter drives the eagle preset losslessly."""
    from propd.training.eagle import EagleTrainConfig, train_eagle

    out = tmp_path / "eagle"
    cfg = EagleTrainConfig(model=str(tiny_dir), out=str(out), max_new_tokens=24, epochs=6, data=str(train_dir),
                           batch_tokens=128, draft_vocab=64, lr=3e-3, val_fraction=0.2)
    report = train_eagle(cfg, log=lambda m: None)
    hist = report["history"]
    assert len(hist) == 6 and hist[-1]["train_loss"] < hist[0]["train_loss"] * 0.8
    val = report["validation"]
    acc = [val[f"top{k}"] for k in (1, 3, 5, 10)]
    assert val["positions"] > 0 and acc == sorted(acc) and acc[0] > 0.05 and acc[-1] > acc[0]  # chance: 1/64
    assert set(report["stage_wall_time_s"]) == {"answers", "features", "training"}
    assert len(json.loads((out / "draft_vocab.json").read_text())["ids"]) <= 64
    again = train_eagle(cfg, log=lambda m: None)  # everything cached: the same drafter
    assert again["validation"] == val
    model = load_model(str(tiny_dir), heads=out)
    assert model.drafter is not None and model.drafter.draft_ids.numel() <= 64
    ids = [[5, 6, 7, 8], [9, 10, 11]]
    ref = Decoder(model, preset="ar").generate_ids(ids, max_new_tokens=20).token_ids
    res = Decoder(model, preset="eagle").generate_ids(ids, max_new_tokens=20)
    assert res.token_ids == ref


def test_eagle_validation_after_every_epoch_and_weight_decay(tiny_dir, train_dir, tmp_path):
    """``val_each_epoch`` records each epoch's validation, the last one the report's own; ``weight_decay`` reaches
    the optimizer (its checkpointed state)."""
    import torch

    from propd.training.eagle import EagleTrainConfig, train_eagle

    out = tmp_path / "eagle"
    cfg = EagleTrainConfig(model=str(tiny_dir), out=str(out), max_new_tokens=24, epochs=2, data=str(train_dir),
                           batch_tokens=128, draft_vocab=64, lr=3e-3, val_fraction=0.2, val_each_epoch=True,
                           weight_decay=0.25)
    logs = []
    report = train_eagle(cfg, log=logs.append)
    hist, val = report["history"], report["validation"]
    assert [h["epoch"] for h in hist] == [1, 2] and all(0 <= h["val_top1"] <= 1 for h in hist)
    assert (hist[-1]["val_top1"], hist[-1]["val_step2_top1"]) == (val["top1"], val["step2_top1"])
    assert sum("validation top-1" in m for m in logs) == 2
    state = torch.load(out / "work" / "eagle_checkpoint.pt", map_location="cpu", weights_only=False)
    assert {g["weight_decay"] for g in state["opt"]["param_groups"]} == {0.25}


def test_train_heads_cli_passes_weight_decay_and_epoch_validation(tiny_dir, train_dir, tmp_path, monkeypatch, capsys):
    import propd.training.eagle as eagle

    seen = []

    def fake(cfg):
        seen.append(cfg)
        return {"validation": {"top1": 0.5, "top3": 0.6, "top10": 0.7, "positions": 3}, "wall_time_s": 1.0}

    monkeypatch.setattr(eagle, "train_eagle", fake)
    argv = ["train-heads", "--kind", "eagle", "--model", str(tiny_dir), "--out", str(tmp_path / "o")]
    assert main(argv + ["--weight-decay", "0.1", "--val-each-epoch"]) == 0
    assert main(argv) == 0
    assert [(c.weight_decay, c.val_each_epoch) for c in seen] == [(0.1, True), (0.0, False)]


def test_train_eagle_with_follow_up_turns(tiny_dir, train_dir, tmp_path):
    """--follow-ups K adds K second-turn conversations per training prompt (the first answer, a generic request,
    the model's answer to it): held out with their prompt, cached by (prompt, k) so that another K reuses them, and
    the validation still reads first answers only."""
    from propd.training.data import FOLLOW_UPS
    from propd.training.eagle import EagleTrainConfig, train_eagle

    common = dict(model=str(tiny_dir), max_new_tokens=12, epochs=1, data=str(train_dir), batch_tokens=128,
                  draft_vocab=64, val_fraction=0.2)
    plain = train_eagle(EagleTrainConfig(out=str(tmp_path / "plain"), **common), log=lambda m: None)
    out = tmp_path / "fu"
    report = train_eagle(EagleTrainConfig(out=str(out), follow_ups=2, **common), log=lambda m: None)
    rows = [json.loads(line) for line in (out / "work" / "follow_up_answers.jsonl").read_text().splitlines()]
    assert report["follow_up_sequences"] == len(rows) == 2 * 25 and {(r["i"], r["k"]) for r in rows} == {
        (i, k) for i in range(25) for k in range(2)}
    assert report["train_sequences"] == 3 * plain["train_sequences"]  # a held-out prompt's conversations stay out
    assert report["validation"]["positions"] == plain["validation"]["positions"]
    tok = load_model(str(tiny_dir), heads="none").tokenizer
    first = json.loads((out / "work" / "answers.jsonl").read_text().splitlines()[3])
    text = tok.decode(rows[7]["prompt"])  # prompt 3, k = 1: the second request after prompt 3's own answer
    assert (rows[7]["i"], rows[7]["k"]) == (3, 1) and FOLLOW_UPS[4] in text
    assert tok.decode(first, skip_special_tokens=True).strip() in text
    logs = []
    again = train_eagle(EagleTrainConfig(out=str(out), follow_ups=1, **common), log=logs.append)
    assert again["follow_up_sequences"] == 25 and not any("follow-up turns" in m for m in logs)  # all cached
    assert not any("computing hidden states" in m for m in logs)  # turn k = 0's features too


def test_train_eagle_with_task_requests(tiny_dir, train_dir, tmp_path):
    """--tasks K adds K single-turn requests per training prompt that wrap its first answer (data.TASKS), beside
    any follow-ups: held out with their prompt, cached by (prompt, k) in their own file, validation on first answers
    only."""
    from propd.training.data import TASKS
    from propd.training.eagle import EagleTrainConfig, train_eagle

    common = dict(model=str(tiny_dir), max_new_tokens=12, epochs=1, data=str(train_dir), batch_tokens=128,
                  draft_vocab=64, val_fraction=0.2)
    plain = train_eagle(EagleTrainConfig(out=str(tmp_path / "plain"), **common), log=lambda m: None)
    out = tmp_path / "tasks"
    report = train_eagle(EagleTrainConfig(out=str(out), follow_ups=1, tasks=2, **common), log=lambda m: None)
    rows = [json.loads(line) for line in (out / "work" / "task_answers.jsonl").read_text().splitlines()]
    assert report["task_sequences"] == len(rows) == 2 * 25 and report["follow_up_sequences"] == 25
    assert {(r["i"], r["k"]) for r in rows} == {(i, k) for i in range(25) for k in range(2)}
    assert report["train_sequences"] == 4 * plain["train_sequences"]  # a held-out prompt's requests stay out
    assert report["validation"]["positions"] == plain["validation"]["positions"]
    tok = load_model(str(tiny_dir), heads="none").tokenizer
    first = json.loads((out / "work" / "answers.jsonl").read_text().splitlines()[3])
    row = next(r for r in rows if (r["i"], r["k"]) == (3, 1))
    text = tok.decode(row["prompt"])  # request (3 + 1) mod 8 around prompt 3's own answer, in the user's turn
    assert TASKS[4].split("{text}")[0].strip() in text
    assert tok.decode(first, skip_special_tokens=True).strip() in text
    logs = []
    again = train_eagle(EagleTrainConfig(out=str(out), follow_ups=1, tasks=1, **common), log=logs.append)
    assert again["task_sequences"] == 25 and not any("task requests" in m for m in logs)  # all cached
    assert not any("computing hidden states" in m for m in logs)


def test_train_eagle_with_passage_requests(tiny_dir, train_dir, tmp_path):
    """--passages K adds K task requests per training prompt around a passage of other training prompts' text, never
    a held-out prompt's; the passages are seeded; a held-out prompt's requests stay out of training."""
    from propd.training.data import TASKS
    from propd.training.eagle import EagleTrainConfig, _passage, train_eagle
    from propd.training.trainer import _val_seqs, training_prompt_texts

    common = dict(model=str(tiny_dir), max_new_tokens=12, epochs=1, data=str(train_dir), batch_tokens=128,
                  draft_vocab=64, val_fraction=0.2)
    plain = train_eagle(EagleTrainConfig(out=str(tmp_path / "plain"), **common), log=lambda m: None)
    out = tmp_path / "passages"
    cfg = EagleTrainConfig(out=str(out), passages=2, **common)
    report = train_eagle(cfg, log=lambda m: None)
    rows = [json.loads(line) for line in (out / "work" / "passage_answers.jsonl").read_text().splitlines()]
    assert report["passage_sequences"] == len(rows) == 2 * 25
    assert report["train_sequences"] == 3 * plain["train_sequences"]
    texts = training_prompt_texts(cfg)
    val = _val_seqs(len(texts), cfg)
    for i, k in ((0, 0), (3, 1), (7, 1)):
        parts = _passage(texts, val, i, k, cfg.seed)
        assert parts and all(p in {texts[j].strip() for j in range(len(texts)) if j not in val and j != i}
                             for p in parts)
        assert parts == _passage(texts, val, i, k, cfg.seed) and parts != _passage(texts, val, i, 1 - k, cfg.seed)
    tok = load_model(str(tiny_dir), heads="none").tokenizer
    row = next(r for r in rows if (r["i"], r["k"]) == (3, 1))
    assert TASKS[4].split("{text}")[0].strip() in tok.decode(row["prompt"])


def test_train_eagle_with_self_written_requests(tiny_dir, train_dir, tmp_path, monkeypatch):
    """--self-prompts N: the model's sampled user turns (after the template's text up to a user turn's content, batch
    b seeded (seed, b)) are kept when they end the turn, have 16+ characters and are new; answered greedily through
    the template; trained on and never held out; cached, so a rerun samples only what a larger N needs."""
    from types import SimpleNamespace

    from propd.training.eagle import EagleTrainConfig, train_eagle

    real, calls = Decoder.generate_ids, []

    def sampled(self, prompt_ids, max_new_tokens=128, temperature=0.0, seed=0, **kw):
        if temperature == 0:
            return real(self, prompt_ids, max_new_tokens=max_new_tokens, **kw)
        calls.append((list(prompt_ids[0]), seed, temperature))
        tok, eos = self.model.tokenizer, min(self.model.eos_token_ids)
        enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        rows = [(enc(f"request {seed} {r} please"), enc("tiny"), enc(f"request {seed} {r - 2} please"))[r % 4 // 2]
                + [eos] if r % 4 != 1 else enc(f"unfinished request {seed} {r}") for r in range(len(prompt_ids))]
        return SimpleNamespace(token_ids=rows)  # per 4 rows: kept, unfinished, too short (r % 4 == 2), a copy

    monkeypatch.setattr(Decoder, "generate_ids", sampled)
    common = dict(model=str(tiny_dir), max_new_tokens=12, epochs=1, data=str(train_dir), batch_tokens=128,
                  draft_vocab=64, val_fraction=0.2, gen_batch_size=8)
    plain = train_eagle(EagleTrainConfig(out=str(tmp_path / "plain"), **common), log=lambda m: None)
    assert not calls
    out = tmp_path / "self"
    report = train_eagle(EagleTrainConfig(out=str(out), self_prompts=3, **common), log=lambda m: None)
    assert [c[1:] for c in calls] == [(0, 1.0), (1, 1.0)]  # 2 kept per batch of 8
    tok = load_model(str(tiny_dir), heads="none").tokenizer
    start = tok.decode(calls[0][0])
    assert start.endswith(tok.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False,
                                                  add_generation_prompt=True).split("Q")[0][-12:])
    rows = [json.loads(line) for line in (out / "work" / "self_prompt_answers.jsonl").read_text().splitlines()]
    asked = [tok.decode(r["prompt"]) for r in rows]
    assert [next(w for w in ("request 0 0 ", "request 0 4 ", "request 1 0 ") if w in a) for a in asked] == [
        "request 0 0 ", "request 0 4 ", "request 1 0 "]
    assert all(a.startswith(start) for a in asked)  # the same template, then the assistant's turn
    assert report["self_prompt_sequences"] == 3 and report["train_sequences"] == plain["train_sequences"] + 3
    assert report["validation"]["positions"] == plain["validation"]["positions"]
    logs = []
    again = train_eagle(EagleTrainConfig(out=str(out), self_prompts=5, **common), log=logs.append)
    assert [c[1] for c in calls] == [0, 1, 2] and again["self_prompt_sequences"] == 5  # one more batch
    assert any("answers to 2 self-written requests (3 cached)" in m for m in logs)


def test_follow_ups_need_a_chat_template(tiny_dir, train_dir, tmp_path):
    import shutil

    from propd.training.eagle import EagleTrainConfig, train_eagle

    plain = tmp_path / "no-template"
    shutil.copytree(tiny_dir, plain)
    conf = json.loads((plain / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(conf))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(PropdError, match="needs a chat template"):
        train_eagle(EagleTrainConfig(model=str(plain), out=str(tmp_path / "o"), data=str(train_dir), follow_ups=1),
                    log=lambda m: None)


def test_train_eagle_keeps_the_hidden_states_of_its_answers(tiny_dir, train_dir, tmp_path):
    """Generating the answers keeps the hidden states the features need (a forward pass over prompt + answer gives
    the same, the last position aside); a larger run keeps its new answers' too; answers cached without them (a
    lost store, an older run) have theirs computed, to nearly the same drafter."""
    import shutil

    from propd.training.eagle import EagleTrainConfig, train_eagle
    from propd.training.hidden import FeatureStore
    from propd.training.trainer import training_prompt_ids

    common = dict(model=str(tiny_dir), out=str(tmp_path / "e"), max_new_tokens=8, epochs=2, data=str(train_dir),
                  batch_tokens=128, draft_vocab=64, val_fraction=0.2)
    logs = []
    train_eagle(EagleTrainConfig(max_prompts=16, **common), log=logs.append)
    report = train_eagle(EagleTrainConfig(**common), log=logs.append)  # 9 more prompts, answered and kept
    assert report["train_sequences"] + report["val_sequences"] == 25
    assert not any("computing hidden states" in m for m in logs)
    work = tmp_path / "e" / "work"
    store = FeatureStore(work / "hidden")
    assert len(store) == 25
    model = load_model(str(tiny_dir), heads="none")
    _, prompt_ids = training_prompt_ids(model, EagleTrainConfig(**common))
    answers = [json.loads(x) for x in (work / "answers.jsonl").read_text().splitlines()]
    m = model.model
    for p, a in zip(prompt_ids, answers):
        kept = store.get(p + a)
        ref, _ = m.hidden_states(m.new_cache(1, len(p + a) + 2), [p + a])
        assert kept.dtype == torch.bfloat16 and not kept[-1].any()
        torch.testing.assert_close(kept[:-1].float(), ref[0, :-1].to(torch.bfloat16).float(), atol=2e-2, rtol=2e-2)
    shutil.rmtree(work / "hidden")
    (work / "eagle_checkpoint.pt").unlink()
    logs = []
    again = train_eagle(EagleTrainConfig(**common), log=logs.append)
    assert any("computing hidden states for 25 of 25 sequences" in m for m in logs)
    assert abs(again["validation"]["top1"] - report["validation"]["top1"]) < 0.05
    assert len(FeatureStore(work / "hidden")) == 25


def test_train_eagle_in_bfloat16(tiny_dir, train_dir, tmp_path):
    """``gen_dtype`` bfloat16 answers with the model in bf16 and keeps that model's hidden states; ``train_dtype``
    bfloat16 autocasts training and still learns; a fresh run gives the same drafter bit for bit; a rerun asking for
    float32 answers from the bf16 cache is refused."""
    import torch
    from safetensors.torch import load_file

    from propd.training.eagle import EagleTrainConfig, train_eagle
    from propd.training.hidden import FeatureStore
    from propd.training.trainer import training_prompt_ids

    common = dict(model=str(tiny_dir), max_new_tokens=16, epochs=4, data=str(train_dir), batch_tokens=128,
                  draft_vocab=64, lr=3e-3, val_fraction=0.2, gen_dtype="bfloat16", train_dtype="bfloat16")
    reports = [train_eagle(EagleTrainConfig(out=str(tmp_path / d), **common), log=lambda m: None) for d in "ab"]
    hist = reports[0]["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] * 0.8 and reports[0]["validation"]["top1"] > 0.05
    assert reports[0]["validation"] == reports[1]["validation"]
    wa, wb = (load_file(tmp_path / d / "model.safetensors") for d in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    work = tmp_path / "a" / "work"
    model = load_model(str(tiny_dir), dtype="bfloat16", heads="none")
    _, prompt_ids = training_prompt_ids(model, EagleTrainConfig(out=str(tmp_path / "a"), **common))
    answers = [json.loads(x) for x in (work / "answers.jsonl").read_text().splitlines()]
    ref = Decoder(model, preset="ar").generate_ids(prompt_ids[:4], max_new_tokens=16).token_ids
    assert answers[:4] == ref
    store = FeatureStore(work / "hidden")
    p, a = prompt_ids[0], answers[0]
    h, _ = model.model.hidden_states(model.model.new_cache(1, len(p + a) + 2), [p + a])
    kept, h = store.get(p + a)[:-1].float(), h[0, :-1].float()  # bf16 sums of a step and a prefill: 1-2 ulps apart
    torch.testing.assert_close(kept, h, atol=0.1, rtol=0.05)
    assert (kept - h).abs().mean() < 0.01
    with pytest.raises(PropdError, match="generated in bfloat16"):
        train_eagle(EagleTrainConfig(out=str(tmp_path / "a"), **(common | {"gen_dtype": "float32"})),
                    log=lambda m: None)


@pytest.mark.parametrize("argv, message", [(["--follow-ups", "1"], "is for --kind eagle"),
                                           (["--gen-dtype", "bfloat16"], "is for --kind eagle"),
                                           (["--train-dtype", "bfloat16"], "is for --kind eagle"),
                                           (["--kind", "eagle", "--follow-ups", "9"], "--follow-ups must be 0-8"),
                                           (["--ttt-steps", "2"], "is for --kind eagle"),
                                           (["--tasks", "1"], "is for --kind eagle"),
                                           (["--kind", "eagle", "--tasks", "9"], "--tasks must be 0-8"),
                                           (["--passages", "1"], "is for --kind eagle"),
                                           (["--kind", "eagle", "--passages", "9"], "--passages must be 0-8"),
                                           (["--kind", "eagle", "--ttt-steps", "0"], "--ttt-steps must be 1-4"),
                                           (["--self-prompts", "4"], "is for --kind eagle"),
                                           (["--kind", "eagle", "--self-prompts", "-1"], "must be 0 or more"),
                                           (["--weight-decay", "0.1"], "is for --kind eagle"),
                                           (["--val-each-epoch"], "is for --kind eagle"),
                                           (["--p-target", "soft"], "is for --kind eagle"),
                                           (["--kind", "eagle", "--weight-decay", "-1"], "--weight-decay must be 0")])
def test_train_heads_cli_rejects_bad_follow_ups(tiny_dir, train_dir, tmp_path, capsys, argv, message):
    code = main(["train-heads", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--data", str(train_dir)]
                + argv)
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 1])
def test_unrolled_training_steps_see_what_drafting_sees(tiny_dir, seed):
    """Step s of the training-time test, read at position i, equals drafting depth s from root i - s + 1: the
    drafter's cache holds true-feature positions up to the root, then each deeper node reads the previous one's
    predicted feature (EAGLE-3 / HASS; propd.training.eagle._unrolled)."""
    import attrs

    from propd.models.eagle import EagleDrafter
    from propd.training.eagle import _unrolled

    torch.manual_seed(seed)
    m = load_model(str(tiny_dir), heads="none").model
    drafter = EagleDrafter(attrs.evolve(m.cfg, num_layers=1), bias=False).attach(m)
    for p in drafter.parameters():  # a drafter far from the identity, so a wrong mask would show
        torch.nn.init.normal_(p, std=0.1)
    B, W, H = 2, 9, m.cfg.hidden_size
    x = torch.randn(B, W, H)
    y = torch.randint(0, m.cfg.vocab_size, (B, W))
    n = torch.tensor([W, W - 2])  # row 1 has two positions of padding
    with torch.no_grad():
        g1 = _unrolled(drafter, [x], y, n)[0]
        step2 = torch.cat([torch.zeros(B, 1, H), g1[:, :-1]], dim=1)
        g2 = _unrolled(drafter, [x, step2], y, n)[1]
        step3 = torch.cat([torch.zeros(B, 1, H), g2[:, :-1]], dim=1)
        outs = _unrolled(drafter, [x, step2, step3], y, n)
        real = torch.arange(W)[None, :] < n[:, None]  # padding positions hold anything
        assert torch.allclose(outs[0][real], g1[real], atol=1e-4) and torch.allclose(outs[1][real], g2[real], atol=1e-4)
        for b in range(B):
            for root in range(int(n[b]) - 2):
                cache = drafter.new_cache(1, W + 4)
                r = root + 1
                a = drafter.attention_inputs(cache, torch.arange(r)[None], torch.ones(r, r, dtype=torch.bool).tril(),
                                             torch.arange(r))
                g = drafter(x[b:b + 1, :r], y[b:b + 1, :r], cache, a)  # the accepted context, true features
                cache.advance(torch.tensor([r]), [r])
                feat = g[:, -1:]
                for depth in (2, 3):  # one node per step, reading the last predicted feature
                    pos = root + depth - 1
                    one = torch.ones(1, 1, dtype=torch.bool)
                    a = drafter.attention_inputs(cache, torch.zeros(1, 1, dtype=torch.long), one,
                                                 torch.zeros(1, dtype=torch.long))
                    feat = drafter(feat, y[b:b + 1, pos:pos + 1], cache, a)
                    cache.advance(torch.tensor([1]), [1])
                    assert torch.allclose(feat[0, 0], outs[depth - 1][b, pos], rtol=1e-4, atol=1e-4), (b, root, depth)


def test_eagle_token_loss_is_taken_at_answer_positions_only(tiny_dir):
    """The token loss and the logits :func:`propd.training.eagle._batch_loss` returns are those of the positions t
    whose target x_{t+2} is an answer token (the prompt's positions are read, never scored), over the draft
    vocabulary, with tokens outside it ignored: checked against the full product at every position."""
    import torch.nn.functional as F

    from propd.models.eagle import EagleDrafter
    from propd.training.eagle import EagleTrainConfig, _batch_loss, _unrolled, draft_projection

    torch.manual_seed(0)
    m = load_model(str(tiny_dir), heads="none").model
    drafter = EagleDrafter(attrs.evolve(m.cfg, num_layers=1), bias=False).attach(m)
    H, V = m.cfg.hidden_size, m.cfg.vocab_size
    lens, prompts = [11, 7], [4, 5]
    feats = {"f": [torch.randn(n, H) for n in lens], "tokens": [torch.randint(0, V, (n,)).tolist() for n in lens],
             "prompt": prompts}
    vocab = list(range(0, V, 2))  # odd tokens fall outside the draft vocabulary
    w_draft, to_draft = draft_projection(m, vocab)
    cfg = EagleTrainConfig(model=str(tiny_dir), out="unused")
    with torch.no_grad():
        parts = _batch_loss(drafter, feats, [0, 1], w_draft, to_draft, cfg, noise=False, steps=1)
        W = max(lens) - 1
        f = torch.zeros(2, W + 1, H)
        tok = torch.zeros(2, W + 1, dtype=torch.long)
        for b, n in enumerate(lens):
            f[b, :n], tok[b, :n] = feats["f"][b], torch.tensor(feats["tokens"][b])
        g = _unrolled(drafter, [f[:, :-1]], tok[:, 1:], torch.tensor(lens) - 1)[0]
    want_logits, want_tgt = [], []
    for b, n in enumerate(lens):
        for t in range(n - 2):
            if t + 2 >= prompts[b]:  # x_{t+2} is an answer token
                want_logits.append(g[b, t] @ w_draft.T)
                want_tgt.append(int(to_draft[feats["tokens"][b][t + 2]]))
    want_logits, want_tgt = torch.stack(want_logits), torch.tensor(want_tgt)
    assert parts["target"][0].tolist() == want_tgt.tolist() and (want_tgt == -100).any() and (want_tgt >= 0).any()
    assert torch.allclose(parts["logits"][0], want_logits, atol=1e-5)
    assert torch.allclose(parts["ploss"], F.cross_entropy(want_logits, want_tgt, ignore_index=-100), atol=1e-5)


def test_eagle_soft_token_loss_is_the_cross_entropy_against_the_base_distribution(tiny_dir):
    """With ``p_target="soft"`` the token loss at each scored position is -sum_v p_v log q_v, p the softmax of the
    base model's draft-vocabulary logits at the true next feature f_{t+1}, q the drafter's (EAGLE's own loss); an
    unrolled second step is scored on its own positions against the same targets."""
    import torch.nn.functional as F

    from propd.models.eagle import EagleDrafter
    from propd.training.eagle import EagleTrainConfig, _batch_loss, draft_projection

    torch.manual_seed(1)
    m = load_model(str(tiny_dir), heads="none").model
    drafter = EagleDrafter(attrs.evolve(m.cfg, num_layers=1), bias=False).attach(m)
    H, V = m.cfg.hidden_size, m.cfg.vocab_size
    lens, prompts = [10, 8], [2, 5]  # row 0 scores position 0, which an unrolled second step cannot
    feats = {"f": [torch.randn(n, H) for n in lens], "tokens": [torch.randint(0, V, (n,)).tolist() for n in lens],
             "prompt": prompts}
    w_draft, to_draft = draft_projection(m, list(range(0, V, 3)))
    cfg = EagleTrainConfig(model=str(tiny_dir), out="unused", p_target="soft", ttt_steps=2)
    with torch.no_grad():
        one = _batch_loss(drafter, feats, [0, 1], w_draft, to_draft, cfg, noise=False, steps=1)
        two = _batch_loss(drafter, feats, [0, 1], w_draft, to_draft, cfg, noise=False, steps=2)
    W = max(lens) - 1
    f = torch.zeros(2, W + 1, H)
    for b, n in enumerate(lens):
        f[b, :n] = feats["f"][b]
    target = torch.softmax(f[:, 1:] @ w_draft.T, dim=-1)  # (2, W, N)

    def soft_ce(logits, scored):
        return -(target[scored] * torch.log_softmax(logits, dim=-1)).sum(-1).mean()

    want = soft_ce(one["logits"][0], one["scored"])
    assert torch.allclose(one["ploss"], want, atol=1e-5)
    assert not torch.allclose(want, F.cross_entropy(one["logits"][0], one["target"][0], ignore_index=-100))
    second = two["scored"].clone()
    second[:, :1] = False  # step 2 at position t drafts from root t - 1
    assert len(two["logits"][1]) == int(second.sum()) < len(two["logits"][0])
    want2 = want + cfg.ttt_decay * soft_ce(two["logits"][1], second)
    assert torch.allclose(two["ploss"], want2, atol=1e-5)


def test_train_eagle_unrolled_and_a_checkpoint_from_before_the_option(tiny_dir, train_dir, tmp_path):
    """--ttt-steps 2 trains (the loss falls, the report has the second step's accuracy); a checkpoint written before
    the ttt fields existed resumes as ttt_steps=1, and not as another config."""
    from propd.training.eagle import EagleTrainConfig, train_eagle

    common = dict(model=str(tiny_dir), max_new_tokens=16, data=str(train_dir), batch_tokens=128, draft_vocab=64,
                  lr=3e-3, val_fraction=0.2)
    report = train_eagle(EagleTrainConfig(out=str(tmp_path / "t"), epochs=4, ttt_steps=2, **common),
                         log=lambda m: None)
    hist, val = report["history"], report["validation"]
    assert report["config"]["ttt_steps"] == 2 and hist[-1]["train_loss"] < hist[0]["train_loss"] * 0.9
    assert 0 < val["step2_top1"] <= 1 and 0 < val["top1"] <= 1
    out = tmp_path / "old"
    cfg = EagleTrainConfig(out=str(out), epochs=1, **common)
    train_eagle(cfg, log=lambda m: None)
    ckpt = out / "work" / "eagle_checkpoint.pt"
    state = torch.load(ckpt, weights_only=False)
    for key in ("ttt_steps", "ttt_decay"):
        del state["config"][key]
    torch.save(state, ckpt)
    logs = []
    train_eagle(cfg, log=logs.append)
    assert "resuming after epoch 1" in logs
    logs.clear()
    train_eagle(attrs.evolve(cfg, ttt_steps=2), log=logs.append)
    assert "resuming after epoch 1" not in logs
