"""Helpers for testing propd and its plugins: tiny random Llama models and the lossless check.

A plugin's tests import these instead of copying propd's conftest::

    from propd.testing import assert_lossless, random_prompts, tiny_model

    def test_my_proposer_is_lossless():
        model = tiny_model(seed=1)
        assert_lossless(model, random_prompts(model, seed=0, lengths=[3, 9]), max_new_tokens=16,
                        sizer="static:tree=chain:4", proposer=MyProposer(MyConfig()))

``assert_lossless`` decodes the prompts together, with the components given, and checks every row against greedy
AR decoding of that prompt alone (fp32): the property every propd component must keep.
"""

from __future__ import annotations

import string
from typing import Any, Sequence

import torch

from propd.models.config import ModelConfig
from propd.models.heads import MedusaHeads
from propd.models.llama import LlamaModel
from propd.models.loading import LoadedModel


def tiny_hf(seed: int = 0, **overrides):
    """A transformers LlamaForCausalLM with random weights (larger than HF's default init, so argmax gaps are wide)."""
    from transformers import LlamaForCausalLM

    cfg = ModelConfig.tiny(**overrides)
    hf_cfg = cfg.to_hf()
    hf_cfg.initializer_range = 0.2
    torch.manual_seed(seed)
    return LlamaForCausalLM(hf_cfg).eval(), cfg


def tiny_model(seed: int = 0, heads: int = 0, eos: frozenset = frozenset(), early: tuple = (),
               drafter: bool = False, **overrides) -> LoadedModel:
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
    if drafter:
        loaded.drafter = random_drafter(model, seed=seed)
    return loaded


def random_drafter(model: LlamaModel, seed: int = 0):
    """An EAGLE drafter (:mod:`propd.models.eagle`) with random weights, attached to ``model``."""
    import attrs

    from propd.models.eagle import EagleDrafter

    torch.manual_seed(seed + 3)
    drafter = EagleDrafter(attrs.evolve(model.cfg, num_layers=1))
    for p in drafter.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return drafter.to(dtype=model.dtype).eval().requires_grad_(False).attach(model)


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



def random_prompts(model: LoadedModel, seed: int, lengths: Sequence[int]) -> list[list[int]]:
    """Random token-id prompts of the given lengths (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def ar_reference(model: LoadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy AR decoding of each prompt alone: what every preset must reproduce."""
    from propd import Decoder

    dec = Decoder(model, preset="ar", entry_points=False)
    return [dec.generate_ids([list(p)], max_new_tokens=max_new_tokens).token_ids[0] for p in prompts]


def assert_lossless(model: LoadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    batch_size: int | None = None, **decoder_kwargs: Any):
    """Decode ``prompts`` with ``Decoder(model, **decoder_kwargs)`` and assert each row equals greedy AR decoding of
    its prompt alone; returns the :class:`propd.GenerationResult` for further checks (accepted lengths, stats)."""
    from propd import Decoder

    decoder_kwargs.setdefault("preset", None)
    refs = ar_reference(model, prompts, max_new_tokens)
    res = Decoder(model, **decoder_kwargs).generate_ids([list(p) for p in prompts], max_new_tokens=max_new_tokens,
                                                        batch_size=batch_size)
    for i, (want, got) in enumerate(zip(refs, res.token_ids)):
        assert got == want, f"row {i}: {got} differs from greedy AR decoding {want}"
    return res


def joined_steps(stats: Sequence) -> int:
    """How many of a result's steps (``GenerationResult.stats``) ran a row beside one that started at another step:
    rows that joined a running batch (``Decoder(continuous=True)``, more prompts than ``batch_size``). A stateful
    plugin's tests assert it is above 0, so that its ``propd_rows_join`` was exercised."""
    first: dict[int, int] = {}
    for i, s in enumerate(stats):
        for r in s.row_ids:
            first.setdefault(r, i)
    return sum(len({first[r] for r in s.row_ids}) > 1 for s in stats)
