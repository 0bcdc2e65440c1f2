"""Vision Transformer inference in plain PyTorch: torchvision's ViT plus checkpoint loaders (no Ray here).

The names below load on first access, so `import vit.preprocess` (the decode workers' import) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "vit.checkpoints": ("CheckpointError", "LoadedModel", "load_model"),
    "vit.convert": ("convert_state_dict",),
    "vit.model": (
        "IMAGENET_MEAN",
        "IMAGENET_STD",
        "PRESETS",
        "VisionTransformer",
        "ViTConfig",
        "autocast",
        "build_model",
        "compile_model",
    ),
    "vit.preprocess": ("patchify",),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if f"vit.{name}" in _HOMES:  # a submodule, e.g. `vit.model` after a bare `import vit`
        return importlib.import_module(f"vit.{name}")
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'vit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
