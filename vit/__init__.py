"""Vision Transformer inference in plain PyTorch: torchvision's ViT plus checkpoint loaders (no Ray here)."""

from vit.checkpoints import CheckpointError, LoadedModel, convert_state_dict, load_model
from vit.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    VisionTransformer,
    ViTConfig,
    autocast,
    build_model,
    compile_model,
    patchify,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "CheckpointError",
    "LoadedModel",
    "ViTConfig",
    "VisionTransformer",
    "autocast",
    "build_model",
    "compile_model",
    "convert_state_dict",
    "load_model",
    "patchify",
]
