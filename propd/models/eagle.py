"""EAGLE feature drafter (Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty",
arXiv 2401.15077).

At position t the drafter reads the base model's final normed hidden state f_t (H,) and the next token x_{t+1}:

    g_{t+1} = Layer(fc(concat(embed(x_{t+1}), f_t)))        fc: (2H -> H), Layer: one Llama decoder layer

``Layer`` has the base model's shape without its input norm (EAGLE's layer 0), and g_{t+1} predicts f_{t+1}; the base
model's frozen ``lm_head`` on g_{t+1} guesses x_{t+2}. Drafting feeds the drafter its own output: a guessed token's
input is (g of its parent, the token). ``embed`` and ``lm_head`` are the base model's, never copied.

Checkpoint format: EAGLE-1/2's (SafeAILab/EAGLE ``eagle/model/cnets1.py`` and ``ea_model.py``): ``config.json``, a
``LlamaConfig`` with ``num_hidden_layers`` 1 (and an optional ``"bias"`` for ``fc``), beside ``model.safetensors`` or
``pytorch_model.bin`` holding ``fc.weight`` (H, 2H), ``fc.bias`` (H,), ``layers.0.self_attn.{q,k,v,o}_proj.weight``,
``layers.0.mlp.{gate,up,down}_proj.weight`` and ``layers.0.post_attention_layernorm.weight`` (no
``input_layernorm``), and possibly ``embed_tokens.weight``, the base model's, which propd does not read. Engines
differ on ``fc``'s bias: SafeAILab's loader follows ``"bias"`` (default true), SGLang's ``llama_eagle.py`` always has
one, vLLM's ``llama_eagle.py`` has none and skips a checkpoint's. So propd trains ``fc`` without a bias and saves a
zero ``fc.bias`` with ``"bias": true``: the same drafter in all three (checked against their model files' names and
shapes: ``fc``, ``layers.0.*`` under a ``model.`` prefix they add, layer 0 without ``input_layernorm``). propd adds an
optional ``draft_vocab.json`` (:mod:`propd.models.heads`): guesses among its most frequent tokens only, so a guess
costs a slice of the vocabulary projection; verification, and so the output, is unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import torch
from torch import nn

from propd.errors import PropdError
from propd.models.cache import KVCache
from propd.models.config import ModelConfig
from propd.models.llama import AttentionInputs, DecoderLayer, tree_attention_inputs

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"
_LAYER_KEYS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
               "post_attention_layernorm.weight")


def is_eagle_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding an EAGLE drafter (a config of a 1-layer Llama beside its weights)."""
    p = Path(path)
    if not (p.is_dir() and (p / CONFIG_FILE).is_file() and any((p / f).is_file() for f in WEIGHT_FILES)):
        return False
    try:
        cfg = json.loads((p / CONFIG_FILE).read_text())
    except ValueError:
        return False
    return isinstance(cfg, dict) and "medusa_num_heads" not in cfg and "num_hidden_layers" in cfg


class NoNorm(nn.Module):
    """EAGLE's layer 0 has no input norm: the identity, with an empty ``weight`` (not saved) that tells the fused
    CPU layer (``cpu_kernel.decoder_layer``) to skip the norm, and the ``eps`` the layer's other norm has."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class EagleDrafter(nn.Module):
    """The drafter; ``forward(features (B, T, H), next_tokens (B, T), cache, a) -> g (B, T, H)``.

    Attach the base model (:meth:`attach`) for its embeddings and ``lm_head``. Its own KV cache (:meth:`new_cache`,
    one layer) holds what it has read of each row; :meth:`attention_inputs` places queries as the base model's do.
    """

    def __init__(self, cfg: ModelConfig, bias: bool = True):
        super().__init__()
        if cfg.num_layers != 1:
            raise PropdError(f"an EAGLE drafter has one decoder layer, this config has {cfg.num_layers}")
        self.cfg = cfg
        H = cfg.hidden_size
        self.fc = nn.Linear(2 * H, H, bias=bias)
        self.layers = nn.ModuleList([DecoderLayer(cfg)])
        self.layers[0].input_layernorm = NoNorm(cfg.rms_norm_eps)
        self.register_buffer("inv_freq", cfg.inv_freq(), persistent=False)
        self.register_buffer("draft_ids", None, persistent=False)  # (N,) token ids it may guess, or None: all
        self._base: list = [None]  # the base LlamaModel, outside this module's parameters and state dict
        self._proj = None  # (key, Linear over the draft vocabulary's rows of lm_head)

    @property
    def device(self) -> torch.device:
        return self.layers[0].post_attention_layernorm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' type (with 8-bit weights, :meth:`in_dtype` ``"q8"``: float32)."""
        return self.layers[0].post_attention_layernorm.weight.dtype

    @property
    def q8(self) -> bool:
        """Whether the products take Q8_0 weights and 8-bit activations (:meth:`in_dtype` ``"q8"``)."""
        return self.__dict__.get("_q8", False)

    def attach(self, base: nn.Module) -> "EagleDrafter":
        """Use ``base``'s (a :class:`propd.models.llama.LlamaModel`) embeddings and ``lm_head``."""
        if base.cfg.hidden_size != self.cfg.hidden_size or base.cfg.vocab_size != self.cfg.vocab_size:
            raise PropdError(f"the EAGLE drafter is for hidden size {self.cfg.hidden_size} and vocabulary "
                             f"{self.cfg.vocab_size}; the model has {base.cfg.hidden_size} and {base.cfg.vocab_size}")
        self._base = [base]
        self._proj = None
        return self

    @property
    def base(self) -> nn.Module:
        if self._base[0] is None:
            raise PropdError("the EAGLE drafter has no base model attached (EagleDrafter.attach)")
        return self._base[0]

    @property
    def draft_size(self) -> int:
        """How many token ids its guesses choose from (the draft vocabulary's, else the whole vocabulary's)."""
        return self.cfg.vocab_size if self.draft_ids is None else self.draft_ids.numel()

    def set_draft_vocab(self, ids: list[int] | torch.Tensor | None) -> None:
        """Guess only among these token ids (None: the whole vocabulary)."""
        if ids is not None:
            ids = torch.as_tensor(ids, dtype=torch.long).flatten()
            if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size:
                raise PropdError(f"a draft vocabulary needs 1 or more token ids in 0..{self.cfg.vocab_size - 1}")
            ids = ids.to(self.device)
        self.draft_ids = ids
        self._proj = None
        self.__dict__.pop("_copies", None)  # copies in other dtypes (in_dtype) were made with the old vocabulary

    # ------------------------------------------------------------------------------------------ forward

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.cfg
        return KVCache(1, batch, c.num_kv_heads, capacity, c.head_dim, self.dtype, self.device)

    def attention_inputs(self, cache: KVCache, node_idx: torch.Tensor, tree_mask: torch.Tensor,
                         depths: torch.Tensor) -> AttentionInputs:
        """As :meth:`propd.models.llama.LlamaModel.attention_inputs`, in the drafter's cache."""
        return tree_attention_inputs(self.cfg, self.inv_freq, self.dtype, cache, node_idx, tree_mask, depths)

    def forward(self, features: torch.Tensor, next_tokens: torch.Tensor, cache: KVCache,
                a: AttentionInputs) -> torch.Tensor:
        x = torch.cat([self.base.embed(next_tokens).to(self.dtype), features.to(self.dtype)], dim=-1)  # (B, T, 2H)
        return self.layers[0](self.fc(x), 0, cache, a)

    def draft_logits(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (.., n) of the guesses from predicted features ``g`` (.., H), and the token id of each column
        (None: column i is token i)."""
        if self.draft_ids is None:
            return self.base.logits(g.to(self.base.dtype)), None
        return self._projection()(g), self.draft_ids

    def _projection(self) -> nn.Module:
        from propd.models.cpu_modules import KernelLinear
        from propd.models.llama import tensor_version

        w = self.base.lm_head.weight
        key = (w.data_ptr(), tensor_version(w), w.dtype, w.device, self.draft_ids.data_ptr())
        if self._proj is None or self._proj[0] != key:
            if self.q8:
                from propd.models.quant import QuantLinear

                proj = QuantLinear.q8_from_float(w.detach().index_select(0, self.draft_ids.to(w.device)))
            else:
                proj = KernelLinear.from_rows(w, self.draft_ids, self.dtype)
            self._proj = (key, proj)
        return self._proj[1]

    def in_dtype(self, dtype: torch.dtype | str) -> "EagleDrafter":
        """This drafter with its weights in ``dtype`` (itself if they are): a copy made once and kept, attached to the
        same base model. ``"q8"``: float32 activations, and every product (``fc``, the layer's, the draft vocabulary's
        rows of ``lm_head``) in Q8_0 blocks with 8-bit activations (:mod:`propd.models.quant`, CPU only): about half
        of bf16's bytes streamed per draft step. Drafts need not match the base model's precision: verification
        decides the output."""
        if (dtype == "q8") == self.q8 and (self.q8 or dtype == self.dtype):
            return self
        if self.q8:
            raise PropdError("an 8-bit copy of a drafter has no float weights left: ask the original for another type")
        copies = self.__dict__.setdefault("_copies", {})
        if dtype not in copies:
            import copy

            base, self._base = self._base, [None]
            try:
                twin = copy.deepcopy(self)
            finally:
                self._base = base
            twin.__dict__.pop("_copies", None)
            twin._proj = None
            if dtype == "q8":
                twin.to(torch.float32)._quantize_q8()
            else:
                twin.to(dtype)
            copies[dtype] = twin.attach(self.base)
            copies[dtype].prepare()
        return copies[dtype]

    def _quantize_q8(self) -> None:
        """Replace each linear layer whose rows are whole Q8_0 blocks (and whose bias, if any, is zero) by a
        :class:`propd.models.quant.QuantLinear` with 8-bit activations."""
        from propd.models.quant import QK, QuantLinear

        for mod in list(self.modules()):
            for name, child in list(mod.named_children()):
                if (isinstance(child, nn.Linear) and child.in_features % QK == 0
                        and (child.bias is None or not bool(child.bias.any()))):
                    setattr(mod, name, QuantLinear.q8_from_float(child.weight))
        self.__dict__["_q8"] = True

    def prepare(self) -> None:
        """On a CPU, the CPU kernel modules for the layer (one fused call per draft step where it fits) and its
        products, weights packed now."""
        if self.device.type != "cpu":
            return
        from propd.models import cpu_modules

        cpu_modules.swap_in(self)
        if self.draft_ids is not None and self._base[0] is not None:
            proj = self._projection()  # built (and packed) now, not inside the first timed step
            if hasattr(proj, "prepare"):
                proj.prepare()

    # ------------------------------------------------------------------------------------------ checkpoints

    def save(self, directory: str | Path, dtype: torch.dtype | None = None, **extra_config: object) -> Path:
        """Write EAGLE's layout (module docstring): ``config.json`` and ``model.safetensors``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if "fc.bias" not in state:  # a zero bias reads the same in every engine (module docstring)
            state["fc.bias"] = torch.zeros(self.cfg.hidden_size, dtype=state["fc.weight"].dtype)
        save_file(state, str(d / WEIGHT_FILES[0]))
        hf = self.cfg.to_hf().to_dict()
        hf.update({"architectures": ["LlamaForCausalLM"], "bias": True,
                   "torch_dtype": str(dtype or self.dtype).removeprefix("torch.")})
        hf.update(extra_config)
        (d / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        return d

    @classmethod
    def load(cls, path: str | Path, base_cfg: ModelConfig) -> "EagleDrafter":
        """Load an EAGLE checkpoint directory (module docstring) for a base model of config ``base_cfg``, with the
        ``draft_vocab.json`` beside it if there is one."""
        from transformers import LlamaConfig

        from propd.models.heads import _read_state, read_draft_vocab

        p = Path(path).expanduser()
        if not p.is_dir():
            raise PropdError(f"EAGLE drafter {p} does not exist (expected a directory with {CONFIG_FILE})")
        files = [p / f for f in WEIGHT_FILES if (p / f).is_file()]
        if not (p / CONFIG_FILE).is_file() or not files:
            raise PropdError(f"no EAGLE drafter in {p}: expected {CONFIG_FILE} and {' or '.join(WEIGHT_FILES)}")
        try:
            raw = json.loads((p / CONFIG_FILE).read_text())
            hf = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "bias")})
        except (ValueError, TypeError) as exc:
            raise PropdError(f"{p / CONFIG_FILE} is not a Llama config: {exc}") from None
        hf.model_type = "llama"
        cfg = ModelConfig.from_hf(hf)
        # the drafter runs at the base model's positions: take its rotary settings, keep the layer's own shape
        cfg = attrs.evolve(cfg, num_layers=1, rope_theta=base_cfg.rope_theta, rope_inv_freq=base_cfg.rope_inv_freq,
                           rope_attention_scaling=base_cfg.rope_attention_scaling,
                           max_position_embeddings=base_cfg.max_position_embeddings)
        if (cfg.hidden_size, cfg.vocab_size) != (base_cfg.hidden_size, base_cfg.vocab_size):
            raise PropdError(f"EAGLE drafter {p} is for hidden size {cfg.hidden_size} and a vocabulary of "
                             f"{cfg.vocab_size}, but the model has {base_cfg.hidden_size} and {base_cfg.vocab_size}")
        state = _read_state(files[0])
        state = {k.removeprefix("model."): v for k, v in state.items()}
        state.pop("embed_tokens.weight", None)  # the base model's own embeddings are used
        missing = [k for k in ["fc.weight", *(f"layers.0.{n}" for n in _LAYER_KEYS)] if k not in state]
        if missing:
            raise PropdError(f"{files[0]} is not an EAGLE drafter checkpoint (missing {', '.join(missing[:3])})")
        bias = "fc.bias" in state  # the tensors win over the config's "bias"
        drafter = cls(cfg, bias=bias)
        expected = drafter.state_dict()
        for k, t in state.items():
            if k not in expected:
                raise PropdError(f"{files[0]} holds {k!r}, which an EAGLE-1/2 drafter does not have")
            if tuple(t.shape) != tuple(expected[k].shape):
                raise PropdError(f"{files[0]}: {k} has shape {tuple(t.shape)}, expected {tuple(expected[k].shape)} "
                                 f"for this model")
        drafter.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        ids = read_draft_vocab(p, cfg.vocab_size)
        if ids is not None:
            drafter.set_draft_vocab(ids)
        return drafter
