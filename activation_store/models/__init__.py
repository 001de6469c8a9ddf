"""Model zoo: a frozen decoder-only transformer in pure JAX with hooks, edits and generation.

See `activation_store.models.lm` for the API.
"""
from .config import ModelConfig
from .edits import Edit, add, clamp, replace
from .generate import Sampling
from .lm import LanguageModel, params_hash
from .random_init import random_model


def load_model(name_or_path) -> LanguageModel:
    """Load "smollm2-135m", a .gguf file or a Hugging Face directory (see models.registry)."""
    from .registry import load_model as f

    return f(name_or_path)


__all__ = ["LanguageModel", "load_model", "random_model", "Edit", "add", "clamp", "replace", "Sampling",
           "ModelConfig", "params_hash"]
