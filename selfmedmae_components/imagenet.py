"""The ImageNet loader's former place: it lives in ``selfmedmae_components.weights.imagenet`` (with the
other checkpoint loaders); its names stay importable from here."""

from .weights.imagenet import (  # noqa: F401
    ImageNetReport,
    inflate_patch_embed,
    load_imagenet_vit,
    read_checkpoint,
    resample_pos_embed,
    to_timm_names,
)
