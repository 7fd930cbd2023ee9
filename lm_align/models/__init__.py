"""Model definitions (Flax NNX)."""

from lm_align.models.transformer import (
    Transformer,
    TransformerConfig,
    attention_mask,
    config_from_dict,
    model_defaults,
)

__all__ = [
    "Transformer",
    "TransformerConfig",
    "attention_mask",
    "config_from_dict",
    "model_defaults",
]
