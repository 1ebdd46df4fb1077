"""Model integrations: transformers models whose KV cache lives in kvservice.

``wrap_model`` switches a Llama-family model's attention to the service; ``Engine`` and
``generate`` run continuous-batching generation (greedy, sampling, beam search) on it.
"""

from kvservice.integrations.generate import Engine, EngineStats, GenerationResult, generate
from kvservice.integrations.hf import ServiceModel, layout_for, load_model, register, wrap_model
from kvservice.integrations.sampling import SamplingParams

__all__ = [
    "Engine",
    "EngineStats",
    "GenerationResult",
    "SamplingParams",
    "ServiceModel",
    "generate",
    "layout_for",
    "load_model",
    "register",
    "wrap_model",
]
