"""Model configuration for the Llama-architecture forward (``propd.models.llama``)."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from propd.errors import PropdError

SUPPORTED_MODEL_TYPES = ("llama",)
_SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn", "longrope")


@attrs.frozen
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # rotary inverse frequencies (head_dim/2,) and cos/sin scale, computed from the HF rope parameters
    rope_inv_freq: tuple[float, ...] | None = None
    rope_attention_scaling: float = 1.0

    @classmethod
    def tiny(cls, **overrides: Any) -> "ModelConfig":
        """A few-layer random model for tests: small enough to decode thousands of tokens per second on a CPU."""
        base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                    num_kv_heads=2, head_dim=16, max_position_embeddings=512)
        base.update(overrides)
        return cls(**base)

    def inv_freq(self) -> torch.Tensor:
        if self.rope_inv_freq is not None:
            return torch.tensor(self.rope_inv_freq, dtype=torch.float32)
        d = self.head_dim
        return 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        """Build from a ``transformers`` config; refuse architectures this forward does not implement."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise PropdError(f"model type {model_type!r} is not supported; propd runs {', '.join(SUPPORTED_MODEL_TYPES)} "
                             "(Llama-architecture) models")
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise PropdError(f"activation {act!r} is not supported (Llama uses silu)")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        inv_freq, scaling = None, 1.0
        if rope_type not in _SUPPORTED_ROPE:
            raise PropdError(f"rope type {rope_type!r} is not supported (supported: {', '.join(_SUPPORTED_ROPE)})")
        if rope_type != "default":
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
            inv_freq = tuple(float(x) for x in freq)
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            max_position_embeddings=hf.max_position_embeddings,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=float(theta),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            rope_inv_freq=inv_freq,
            rope_attention_scaling=float(scaling),
        )

    def to_hf(self) -> Any:
        """The equivalent ``transformers.LlamaConfig`` (used to build reference models in tests)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias, mlp_bias=self.mlp_bias,
        )
