from .classifier import ViTClassifier
from .mae import MaskedAutoencoder
from .pos_embed import sincos_pos_embed
from .unetr import UNETR
from .vit import TransformerBlock, ViTEncoder

__all__ = ["MaskedAutoencoder", "UNETR", "ViTClassifier", "ViTEncoder", "TransformerBlock", "sincos_pos_embed"]
