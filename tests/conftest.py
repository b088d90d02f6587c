"""Fixtures: tiny random Llama models (in memory and as HF directories with a tokenizer)."""

from __future__ import annotations

import os
import string
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins" / "propd-oracle"))  # the test-only plugin, importable without installing

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=40, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=40)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from propd.models.config import ModelConfig  # noqa: E402
from propd.models.heads import MedusaHeads  # noqa: E402
from propd.models.llama import LlamaModel  # noqa: E402
from propd.models.loading import LoadedModel  # noqa: E402


def tiny_hf(seed: int = 0, **overrides):
    """A transformers LlamaForCausalLM with random weights (larger than HF's default init, so argmax gaps are wide)."""
    from transformers import LlamaForCausalLM

    cfg = ModelConfig.tiny(**overrides)
    hf_cfg = cfg.to_hf()
    hf_cfg.initializer_range = 0.2
    torch.manual_seed(seed)
    return LlamaForCausalLM(hf_cfg).eval(), cfg


def tiny_loaded(seed: int = 0, heads: int = 0, eos: frozenset = frozenset(), early: tuple = (),
                **overrides) -> LoadedModel:
    hf, cfg = tiny_hf(seed, **overrides)
    model = LlamaModel(cfg)
    model.load_state_dict(hf.state_dict(), strict=False)
    model.eval().requires_grad_(False)
    loaded = LoadedModel(name="tiny", model=model, tokenizer=None, generation_eos=eos)
    if heads:
        loaded.heads = random_heads(cfg, heads, seed=seed, lm_head=model.lm_head)
    if early:
        import functools

        from propd.models.heads import EarlyHeads

        torch.manual_seed(seed + 2)
        blocks = EarlyHeads(cfg.hidden_size, list(early))
        for p in blocks.parameters():
            torch.nn.init.normal_(p, std=0.1)
        blocks.eval().requires_grad_(False)
        loaded.early_heads = {n: functools.partial(blocks.logits, n, norm=model.model.norm, lm_head=model.lm_head)
                              for n in blocks.layers}
    return loaded


def random_heads(cfg: ModelConfig, num_heads: int, seed: int = 0, lm_head=None, own: bool = False) -> MedusaHeads:
    torch.manual_seed(seed + 1)
    heads = MedusaHeads(cfg.hidden_size, cfg.vocab_size, num_heads, 1, own_lm_head=own, shared_lm_head=lm_head)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return heads.eval().requires_grad_(False)


def char_tokenizer():
    """A character-level fast tokenizer with BOS/EOS and a ChatML-style chat template (no download needed)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "</s>"])
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved as an HF directory (config, safetensors, tokenizer), vocabulary 128, 6 layers (so that the
    presets' default pruning layer 4 exists)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    hf, _ = tiny_hf(0, vocab_size=128, num_layers=6)
    hf.save_pretrained(str(d))
    char_tokenizer().save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def tiny_heads_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-heads")
    random_heads(ModelConfig.tiny(), 4).save(d)
    from propd.models.heads import EarlyHeads

    torch.manual_seed(5)
    early = EarlyHeads(ModelConfig.tiny().hidden_size, [1, 2, 3, 4])
    for p in early.parameters():
        torch.nn.init.normal_(p, std=0.1)
    early.save(d)  # early-exit heads beside the Medusa heads, for the pruners
    return d
