from .classifier import ViTClassifier
from .mae import MaskedAutoencoder
from .pos_embed import sincos_pos_embed
from .unetr import UNETR
from .vit import TransformerBlock, ViTEncoder, set_activation_checkpointing

__all__ = [
    "MaskedAutoencoder",
    "UNETR",
    "ViTClassifier",
    "ViTEncoder",
    "TransformerBlock",
    "sincos_pos_embed",
    "set_activation_checkpointing",
]
