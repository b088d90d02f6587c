"""A tiny Llama written as a GGUF file (random weights, a byte-level BPE vocabulary), so tests can convert, corrupt and
kill the conversion of a real GGUF without downloading one."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np


def write_tiny_gguf(path: Path, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    ffn: int = 128, quantized: bool = False) -> Path:
    """A tiny Llama GGUF file; ``quantized``: its layers' matrices Q4_1 and the embedding and output Q8_0, as the
    default model's file (float32 otherwise)."""
    import gguf

    rng = np.random.default_rng(seed)
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    chars = [c for c in string.ascii_letters + string.digits + string.punctuation]
    tokens = specials + chars + ["Ġ", "Ċ"]
    tokens += [f"Ġ{c}" for c in string.ascii_lowercase][: 128 - len(tokens)]
    vocab = len(tokens)
    merges = [f"Ġ {c}" for c in string.ascii_lowercase[: vocab - len(specials) - len(chars) - 2]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (vocab - len(specials)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(4)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    def t(name, *shape):
        a = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        if not quantized:
            w.add_tensor(name, a)
            return
        kind = gguf.GGMLQuantizationType.Q8_0 if name in ("token_embd.weight", "output.weight") else \
            gguf.GGMLQuantizationType.Q4_1
        w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)

    t("token_embd.weight", vocab, hidden)
    for i in range(layers):
        kv = hidden // heads * kv_heads
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        t(f"blk.{i}.attn_q.weight", hidden, hidden)
        t(f"blk.{i}.attn_k.weight", kv, hidden)
        t(f"blk.{i}.attn_v.weight", kv, hidden)
        t(f"blk.{i}.attn_output.weight", hidden, hidden)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        t(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        t(f"blk.{i}.ffn_up.weight", ffn, hidden)
        t(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    t("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
