"""Supported Hugging Face causal LMs described as plain data (`ModelSpec`) for the fast engine.

    spec = describe(model)        # views of the model's parameters; UnsupportedModel otherwise
    reason = model_reason(model)  # None when describe() works, else why not
"""
from . import gemma3, gpt2, gpt_neox, llama, olmo2, phi3
from .spec import Layer, Linear, ModelSpec, Norm, Rotary, UnsupportedModel

_FAMILIES = {
    "llama": llama.describe,
    "mistral": llama.describe,
    "qwen2": llama.describe,
    "qwen3": llama.describe,
    "olmo2": olmo2.describe,
    "phi3": phi3.describe,
    "gemma3_text": gemma3.describe,
    "gpt2": gpt2.describe,
    "gpt_neox": gpt_neox.describe,
}

__all__ = ["describe", "model_reason", "UnsupportedModel", "ModelSpec", "Layer", "Linear", "Norm", "Rotary"]


def describe(model) -> ModelSpec:
    """The ModelSpec of a supported HF causal LM; raises UnsupportedModel (a ValueError) with the reason."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModel(f"{type(model).__name__} is not a Hugging Face model (no config.model_type)")
    family = _FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedModel(
            f"model type '{model_type}' is not supported (supported: {', '.join(_FAMILIES)})")
    try:
        return family(model)
    except UnsupportedModel:
        raise
    except (AttributeError, IndexError, TypeError) as exc:
        raise UnsupportedModel(f"{type(model).__name__} ({model_type}) has an unexpected module layout ({exc})")


def model_reason(model):
    """None when describe(model) works, else the reason it does not. Builds views only, no copies."""
    try:
        describe(model)
    except UnsupportedModel as exc:
        return str(exc)
    return None
