"""propd: lossless parallel decoding for Llama-family LLMs.

Token trees checked in one forward pass (Medusa, Cai et al. 2023; BPD, Stern et al. 2018), early pruning and dynamic
tree sizing (ProPD, Zhong et al. 2024, arXiv 2402.13485), as pluggable strategies over one batched decoding loop.
"""

from propd.decoder import Decoder
from propd.errors import PropdError
from propd.hookspecs import hookimpl
from propd.models.loading import DEFAULT_MODEL, LoadedModel, load_model
from propd.presets import PRESETS
from propd.tree import DraftTree
from propd.types import Acceptance, GenerationResult, StepContext, StepStats

__all__ = [
    "Acceptance", "DEFAULT_MODEL", "Decoder", "DraftTree", "GenerationResult", "LoadedModel", "PRESETS",
    "PropdError", "StepContext", "StepStats", "hookimpl", "load_model",
]
__version__ = "0.1.0"
