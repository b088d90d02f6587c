"""Baselines nobody here wrote: ``transformers``' own ``generate``, run in the same process on the same weights.

* ``hf``: ``generate(do_sample=False)``, batched with left padding.
* ``hf-pld``: prompt lookup decoding (Saxena 2023) through ``prompt_lookup_num_tokens``; transformers supports it
  at batch size 1 only.
"""

from __future__ import annotations

import time

import torch

from propd.errors import PropdError

BASELINES = ("hf", "hf-pld")


class HFBaseline:
    def __init__(self, loaded, kind: str, lookup_tokens: int = 10):
        if kind not in BASELINES:
            raise PropdError(f"unknown baseline {kind!r} (known: {', '.join(BASELINES)})")
        if loaded.path is None:
            raise PropdError("transformers baselines need a model loaded from a directory")
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        logging.set_verbosity_error()
        self.kind, self.lookup = kind, lookup_tokens
        self.eos = sorted(loaded.eos_token_ids)
        self.pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else (self.eos or [0])[0]
        self.model = AutoModelForCausalLM.from_pretrained(str(loaded.path), dtype=loaded.dtype).to(loaded.device)
        self.model.eval()
        self.calls = 0
        self.model.register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))

    def supports(self, batch_size: int) -> str | None:
        """None when this baseline can run at ``batch_size``, else the reason it cannot."""
        if self.kind == "hf-pld" and batch_size != 1:
            return "transformers' prompt lookup decoding supports batch size 1 only"
        return None

    @torch.inference_mode()
    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list[int], float]:
        """Token ids per prompt (cut after the first EOS), forward passes per batch, and wall time."""
        dev = self.model.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad,
                  eos_token_id=self.eos or None)
        if self.kind == "hf-pld":
            kw["prompt_lookup_num_tokens"] = self.lookup
        self.calls = 0
        t = time.perf_counter()
        out = self.model.generate(ids.to(dev), attention_mask=mask.to(dev), **kw)
        wall = time.perf_counter() - t
        results = []
        for row in out[:, width:].tolist():
            cut = len(row)
            for j, tok in enumerate(row):
                if tok in self.eos:
                    cut = j + 1
                    break
            results.append(row[:cut])
        return results, self.calls, wall
