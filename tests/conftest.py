"""Fixtures: tiny random Llama models (in memory and as HF directories with a tokenizer)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins" / "propd-oracle"))  # the test-only plugin, importable without installing
sys.path.insert(0, str(ROOT / "tools"))  # the maintainers' tools (results, tune_docs)

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=40, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=40)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from propd.models.config import ModelConfig  # noqa: E402
from propd.testing import char_tokenizer, random_heads, tiny_hf, tiny_model  # noqa: E402,F401


tiny_loaded = tiny_model  # the name these tests use


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
