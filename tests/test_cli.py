"""The command line on a tiny model directory: output format and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from propd import PropdError
from propd.cli import main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json(capsys, tiny_dir):
    code, out, err = run(capsys, "generate", "--model", str(tiny_dir), "--json", "--max-new-tokens", "6",
                         "hello", "a longer prompt here")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    for r in rows:
        assert {"index", "text", "token_ids", "new_tokens", "steps", "mean_accepted_tokens", "wall_time_s"} <= set(r)
        assert r["new_tokens"] == len(r["token_ids"]) <= 6 and r["mean_accepted_tokens"] == 1.0
        assert isinstance(r["text"], str)
    assert "tok/s" in err


def test_one_prompt_streams_the_text_json_gives(capsys, tiny_dir):
    args = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "12", "--no-chat", "hello there"]
    code, out, err = run(capsys, *args)
    assert code == 0 and "tok/s" in err
    _, js, _ = run(capsys, *args, "--json")
    assert out == json.loads(js)["text"] + "\n"


def test_stop_cuts_the_answer_before_it_streamed_or_not(capsys, tiny_dir):
    args = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "24", "--no-chat", "hello there"]
    _, js, _ = run(capsys, *args, "--json")
    full = json.loads(js)["text"]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert len(stop) == 2 and stop in full
    code, out, _ = run(capsys, *args, "--stop", stop)
    _, js, _ = run(capsys, *args, "--stop", "never seen", "--stop", stop, "--json")
    cut = json.loads(js)
    assert code == 0 and cut["text"] == full[:full.find(stop)] and out == cut["text"] + "\n"
    assert cut["new_tokens"] < json.loads(run(capsys, *args, "--json")[1])["new_tokens"]


def test_medusa_preset_with_heads_matches_ar(capsys, tiny_dir, tiny_heads_dir):
    base = ["generate", "--model", str(tiny_dir), "--json", "--max-new-tokens", "12", "--no-chat", "abc", "xyz!"]
    _, ar, _ = run(capsys, *base)
    code, med, _ = run(capsys, *base, "--preset", "medusa", "--heads", str(tiny_heads_dir), "--batch-size", "1")
    assert code == 0
    assert [json.loads(x)["token_ids"] for x in ar.splitlines()] == [json.loads(x)["token_ids"]
                                                                       for x in med.splitlines()]


def test_prompts_file_and_stdin(capsys, tiny_dir, tmp_path, monkeypatch):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question_id": 1, "turns": ["first"]}\n{"prompt": "second"}\n"third"\n')
    code, out, _ = run(capsys, "generate", "--model", str(tiny_dir), "--json", "--max-new-tokens", "2",
                       "--prompts-file", str(f))
    assert code == 0 and len(out.splitlines()) == 3
    two = tmp_path / "two.jsonl"  # a two-turn question: the second turn continues the conversation
    two.write_text('{"question_id": 1, "turns": ["first", "and then?"]}\n"single"\n')
    code, out, _ = run(capsys, "generate", "--model", str(tiny_dir), "--json", "--max-new-tokens", "3",
                       "--prompts-file", str(two))
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 2 and len(rows[0]["turns"]) == 2 and "turns" not in rows[1]
    from propd import Decoder, load_model
    from propd.chat import conversation

    dec = Decoder(load_model(str(tiny_dir)), preset="ar")
    first = dec.generate(["first"], max_new_tokens=3).texts[0]
    second = dec.generate([conversation(["first", "and then?"], [first])], max_new_tokens=3)
    assert rows[0]["turns"] == [first, second.texts[0]] and rows[0]["token_ids"] == second.token_ids[0]
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("one\n\ntwo\n"))
    code, out, _ = run(capsys, "generate", "--model", str(tiny_dir), "--json", "--max-new-tokens", "2")
    assert code == 0 and len(out.splitlines()) == 2


def test_sampling_flags(capsys, tiny_dir):
    args = ["generate", "--model", str(tiny_dir), "--preset", "ar", "--max-new-tokens", "8", "--temperature", "1.5",
            "--top-p", "0.95", "--json", "hi", "hi"]
    code, out, _ = run(capsys, *args, "--seed", "4")
    rows = [json.loads(line)["token_ids"] for line in out.splitlines()]
    assert code == 0 and len(rows) == 2 and rows[0] != rows[1]  # copies of one prompt: independent samples
    assert [json.loads(line)["token_ids"] for line in run(capsys, *args, "--seed", "4")[1].splitlines()] == rows
    assert [json.loads(line)["token_ids"] for line in run(capsys, *args, "--seed", "5")[1].splitlines()] != rows


def test_listings(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and all(p in out for p in ("ar", "bpd", "medusa"))

    code, out, _ = run(capsys, "components")
    assert code == 0 and "static" in out and "greedy" in out
    code, out, _ = run(capsys, "models", "list")
    assert "smollm2-135m-instruct" in out


@pytest.mark.parametrize("args, message", [
    (["generate", "--max-new-tokens", "4", ""], "prompt 0 is empty"),
    (["generate", "--max-new-tokens", "0", "hi"], "must be positive"),
    (["generate", "--threads", "0", "hi"], "--threads must be auto or a positive whole number"),
    (["generate", "--preset", "warp", "hi"], "unknown preset"),
    (["generate", "--model", "/no/such/dir", "hi"], "not found"),
    (["generate", "--preset", "medusa", "hi"], "needs Medusa heads"),
    (["generate", "--heads", "/no/heads", "hi"], "does not exist"),
    (["generate", "--max-new-tokens", "600", "hi"], "context"),
    (["generate", "--prompts-file", "/no/file.txt"], "does not exist"),
    (["generate", "--device", "cuda:7", "hi"], "CUDA is not available"),
    (["models", "fetch", "gpt-9"], "unknown model"),
    (["generate", "--temperature", "-1", "hi"], "temperature must be >= 0"),
    (["generate", "--temperature", "0.7", "--top-p", "0", "hi"], "top_p must be in (0, 1]"),
    (["generate", "--temperature", "0.7", "--top-k", "-2", "hi"], "top_k must be"),
    (["generate", "--stop", "", "hi"], "stop must be a non-empty string"),
])
def test_bad_input_one_line_exit_2(capsys, tiny_dir, args, message):
    if "--model" not in args and args[0] == "generate":
        args = args[:1] + ["--model", str(tiny_dir)] + args[1:]
    if "cuda" in " ".join(args):
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            args, message = [a.replace("cuda:7", "cuda:99") for a in args], "CUDA device"
    code, out, err = run(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("propd: error: ") and message in lines[0], err


def test_a_cuda_device_beyond_the_machines_is_refused(monkeypatch):
    import torch

    from propd.models.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("cuda:0") == resolve_device("cuda") == torch.device("cuda:0")  # as its tensors report
    with pytest.raises(PropdError, match=r"has 1 CUDA device \(cuda:0..cuda:0\)"):
        resolve_device("cuda:3")


def test_no_prompts_exit_2_without_traceback(tiny_dir):
    proc = subprocess.run([sys.executable, "-m", "propd.cli", "generate", "--model", str(tiny_dir)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "propd: error: no prompts given: pass PROMPT arguments, --prompts-file, or lines on stdin"


def test_generate_component_overrides_and_step_stats(capsys, tiny_dir, tiny_heads_dir):
    base = ["generate", "--model", str(tiny_dir), "--heads", str(tiny_heads_dir), "--json", "--max-new-tokens", "10",
            "--no-chat", "abc", "hello there"]
    _, ar, _ = run(capsys, *base)
    code, out, _ = run(capsys, *base, "--preset", "medusa", "--sizer", "static:tree=chain:2",
                       "--pruner", "early-topk:layer=2,k=3")
    assert code == 0
    rows = [json.loads(x) for x in out.splitlines()]
    assert [r["token_ids"] for r in rows] == [json.loads(x)["token_ids"] for x in ar.splitlines()]
    for r in rows:
        st = r["step_stats"]
        assert st and all(s["tree_nodes"] == 3 and s["nodes_after_pruning"] <= 3 for s in st)
        assert sum(s["accepted"] for s in st) + 1 >= r["new_tokens"]  # the prefill gives the first token
        assert all(s["step_time_s"] > 0 and s["batch_size"] in (1, 2) for s in st)
    code, _, err = run(capsys, *base, "--preset", "medusa", "--pruner", "early-topk:depth=2")
    assert code == 2 and "has no option(s) ['depth']" in err
    code, _, err = run(capsys, *base, "--verifier", "typical:temperature=0")
    assert code == 2 and "temperature > 0" in err


def test_results_tool_checks_its_input(capsys, tmp_path):
    from results import main as results_main  # tools/results.py

    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "category": "qa", "turns": ["hi"]}\n')
    assert results_main(["--only", "fp64", "--questions", str(questions), "--out", str(tmp_path / "r")]) == 2
    assert "unknown run(s) ['fp64']" in capsys.readouterr().err
    assert results_main(["--questions", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
