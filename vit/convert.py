"""ViT state dicts from torchvision, timm and Hugging Face → torchvision's names, by table, checked.

`convert_state_dict` strips wrapper prefixes (`module.`, `_orig_mod.`), detects the source from tell-tale
keys and renames every key by its source's table (Hugging Face's split q/k/v are fused), each source key used
once; `infer_config` reads the architecture a converted state dict determines; `resample_pos_embedding`
moves a position embedding to another grid as the source library would; `check_state_dict` compares a state
dict with a model key by key. Every failure is a `CheckpointError` naming the file and the offending keys.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vit.model import LEGACY_MLP_NAMES, PRESETS, ViTConfig

SOURCE_FORMATS = ("torchvision", "timm", "huggingface")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what to do."""


# --- rename tables: (pattern for a whole source key, torchvision name, part of a fused q;k;v or None) ---

_LAYER = r"encoder.layers.encoder_layer_\1"
Rename = tuple[str, str, int | None]

TORCHVISION_RENAMES: list[Rename] = [
    *((rf"(.+\.mlp)\.{old}\.(weight|bias)", rf"\1.{new}.\2", None) for old, new in LEGACY_MLP_NAMES.items()),
    (r"(.+)", r"\1", None),  # everything else already has its torchvision name
]

TIMM_RENAMES: list[Rename] = [
    (r"cls_token", "class_token", None),
    (r"pos_embed", "encoder.pos_embedding", None),
    (r"patch_embed\.proj\.(weight|bias)", r"conv_proj.\1", None),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", _LAYER + r".ln_1.\2", None),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", _LAYER + r".self_attention.in_proj_\2", None),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", _LAYER + r".self_attention.out_proj.\2", None),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", _LAYER + r".ln_2.\2", None),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", _LAYER + r".mlp.0.\2", None),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", _LAYER + r".mlp.3.\2", None),
    (r"norm\.(weight|bias)", r"encoder.ln.\1", None),
    (r"pre_logits\.fc\.(weight|bias)", r"heads.pre_logits.\1", None),  # timm < 0.6 with representation_size
    (r"head\.(weight|bias)", r"heads.head.\1", None),
]

_HF = r"(?:vit\.)?"  # ViTForImageClassification nests the encoder under `vit.`; a bare ViTModel does not
_HF_LAYER = _HF + r"encoder\.layer\.(\d+)\."
HUGGINGFACE_RENAMES: list[Rename] = [
    (_HF + r"embeddings\.cls_token", "class_token", None),
    (_HF + r"embeddings\.position_embeddings", "encoder.pos_embedding", None),
    (_HF + r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"conv_proj.\1", None),
    (_HF_LAYER + r"layernorm_before\.(weight|bias)", _LAYER + r".ln_1.\2", None),
    (_HF_LAYER + r"attention\.attention\.query\.(weight|bias)", _LAYER + r".self_attention.in_proj_\2", 0),
    (_HF_LAYER + r"attention\.attention\.key\.(weight|bias)", _LAYER + r".self_attention.in_proj_\2", 1),
    (_HF_LAYER + r"attention\.attention\.value\.(weight|bias)", _LAYER + r".self_attention.in_proj_\2", 2),
    (_HF_LAYER + r"attention\.output\.dense\.(weight|bias)", _LAYER + r".self_attention.out_proj.\2", None),
    (_HF_LAYER + r"layernorm_after\.(weight|bias)", _LAYER + r".ln_2.\2", None),
    (_HF_LAYER + r"intermediate\.dense\.(weight|bias)", _LAYER + r".mlp.0.\2", None),
    (_HF_LAYER + r"output\.dense\.(weight|bias)", _LAYER + r".mlp.3.\2", None),
    (_HF + r"layernorm\.(weight|bias)", r"encoder.ln.\1", None),
    (_HF + r"pooler\.dense\.(weight|bias)", r"heads.pre_logits.\1", None),  # + tanh, as HF's pooler
    (r"classifier\.(weight|bias)", r"heads.head.\1", None),
]

RENAMES: dict[str, list[Rename]] = {
    "torchvision": TORCHVISION_RENAMES,
    "timm": TIMM_RENAMES,
    "huggingface": HUGGINGFACE_RENAMES,
}

# How each library resamples its position embedding to another grid (bicubic, class token kept).
RESAMPLING: dict[str, dict[str, bool]] = {
    "torchvision": {"align_corners": True, "antialias": False},  # interpolate_embeddings
    "timm": {"align_corners": False, "antialias": True},  # resample_abs_pos_embed
    "huggingface": {"align_corners": False, "antialias": False},  # ViTEmbeddings.interpolate_pos_encoding
}


def strip_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Removes wrapper prefixes (`module.`, `_orig_mod.`) shared by every key, repeatedly."""
    sd = dict(state_dict)
    while sd:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    """'torchvision', 'timm' or 'huggingface', from tell-tale keys (prefixes already stripped)."""
    keys = set(state_dict)
    if "conv_proj.weight" in keys or "class_token" in keys:
        return "torchvision"
    if "patch_embed.proj.weight" in keys or "cls_token" in keys:
        return "timm"
    if keys & {
        "embeddings.patch_embeddings.projection.weight",
        "vit.embeddings.patch_embeddings.projection.weight",
    }:
        return "huggingface"
    raise CheckpointError(
        f"cannot tell which library wrote this checkpoint (first keys: {_first(sorted(keys))}); "
        "expected torchvision (conv_proj.weight), timm (patch_embed.proj.weight) or Hugging Face "
        "(vit.embeddings.patch_embeddings.projection.weight) ViT weights"
    )


def convert_state_dict(
    state_dict: Mapping[str, Tensor], source_format: str | None = None, *, name: str = "checkpoint"
) -> tuple[dict[str, Tensor], str]:
    """Renames a torchvision, timm or Hugging Face ViT state dict to torchvision's names.

    Returns (converted state dict, source format). Every source key must match exactly one rule and no two
    keys may land on the same name; Hugging Face's q, k, v are fused into `in_proj_*` (q;k;v, as torchvision
    and timm store them). A headless Hugging Face ViTModel's pooler is dropped: it feeds no head, and the
    CLS embedding is taken before it.
    """
    sd = strip_prefixes(state_dict)
    fmt = source_format or detect_format(sd)
    if fmt not in RENAMES:
        raise CheckpointError(
            f"{name}: unknown source format {fmt!r}; expected one of {', '.join(SOURCE_FORMATS)}"
        )
    table = [(re.compile(pattern), target, part) for pattern, target, part in RENAMES[fmt]]
    out: dict[str, Tensor] = {}
    fused: dict[str, list[Tensor | None]] = {}
    origin: dict[tuple[str, int | None], str] = {}
    unmatched, collisions = [], []
    for key, tensor in sd.items():
        rule = next(((p, t, part) for p, t, part in table if p.fullmatch(key)), None)
        if rule is None:
            unmatched.append(key)
            continue
        pattern, template, part = rule
        target = pattern.fullmatch(key).expand(template)  # type: ignore[union-attr]
        if (target, part) in origin:
            collisions.append(f"{origin[target, part]} and {key} → {target}")
            continue
        origin[target, part] = key
        if part is None:
            out[target] = tensor
        else:
            fused.setdefault(target, [None, None, None])[part] = tensor
    if unmatched:
        raise CheckpointError(
            f"{name}: {len(unmatched)} {fmt} keys have no ViT counterpart: {_first(unmatched)}"
        )
    if collisions:
        raise CheckpointError(f"{name}: several keys map to one parameter: {_first(collisions)}")
    for target, parts in fused.items():
        if any(p is None for p in parts):
            missing = [qkv for qkv, p in zip(("query", "key", "value"), parts, strict=True) if p is None]
            raise CheckpointError(f"{name}: {target} lacks its {'/'.join(missing)} part")
        out[target] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    if fmt == "huggingface" and "heads.head.weight" not in out:
        out = {k: v for k, v in out.items() if not k.startswith("heads.pre_logits.")}
    return out, fmt


def infer_config(
    state_dict: Mapping[str, Tensor],
    preset: str,
    *,
    layer_norm_eps: float = 1e-6,
    num_heads: int | None = None,
    name: str = "checkpoint",
) -> ViTConfig:
    """The architecture a converted state dict determines; the preset supplies the number of heads.

    A preset whose width, depth, MLP width or patch size (or heads, when the checkpoint's config names them)
    differ from the checkpoint's is a CheckpointError naming both.
    """
    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    needed = [
        "class_token",
        "conv_proj.weight",
        "encoder.pos_embedding",
        "encoder.layers.encoder_layer_0.mlp.0.weight",
    ]
    if missing := [k for k in needed if k not in state_dict]:
        raise CheckpointError(f"{name} is not a complete ViT: it lacks {_first(missing)}")
    pos = state_dict["encoder.pos_embedding"]
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        raise CheckpointError(
            f"{name}: position embedding {tuple(pos.shape)} is not a class token plus a square grid"
        )
    layers = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.layers\.encoder_layer_(\d+)\.", k))
    }
    patch = state_dict["conv_proj.weight"].shape[-1]
    found = {
        "hidden_dim": state_dict["class_token"].shape[-1],
        "num_layers": max(layers) + 1 if layers else 0,
        "mlp_dim": state_dict["encoder.layers.encoder_layer_0.mlp.0.weight"].shape[0],
        "patch_size": patch,
    }
    if num_heads is not None:
        found["num_heads"] = num_heads
    want = PRESETS[preset]
    if any(getattr(want, k) != v for k, v in found.items()):
        fits = [p for p, c in PRESETS.items() if all(getattr(c, k) == v for k, v in found.items())]
        hint = f"use preset {fits[0]!r}" if fits else "no preset has this shape"
        raise CheckpointError(
            f"{name} does not match preset {preset!r}: the checkpoint has {_describe(found)}, "
            f"the preset has {_describe({k: getattr(want, k) for k in found})}; {hint}"
        )
    head = state_dict.get("heads.head.weight")
    pre_logits = state_dict.get("heads.pre_logits.weight")
    return dataclasses.replace(
        want,
        image_size=grid * patch,
        num_classes=0 if head is None else head.shape[0],
        representation_size=None if pre_logits is None else pre_logits.shape[0],
        layer_norm_eps=layer_norm_eps,
    )


def resample_pos_embedding(
    pos_embedding: Tensor, grid_size: int, *, align_corners: bool = False, antialias: bool = False
) -> Tensor:
    """(1, 1 + g², D) → (1, 1 + grid_size², D): bicubic over the patch grid, the class token kept as is."""
    cls, patches = pos_embedding[:, :1], pos_embedding[:, 1:]  # (1, 1, D), (1, g², D)
    g, D = math.isqrt(patches.shape[1]), patches.shape[2]
    grid = patches.reshape(1, g, g, D).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    grid = F.interpolate(
        grid, size=(grid_size, grid_size), mode="bicubic", align_corners=align_corners, antialias=antialias
    )
    patches = grid.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, D)  # (1, grid_size², D)
    return torch.cat([cls, patches.to(pos_embedding.dtype)], dim=1)


def check_state_dict(
    state_dict: Mapping[str, Tensor], model: torch.nn.Module, *, name: str = "checkpoint"
) -> None:
    """Every model key filled, none left over, shapes equal; else a CheckpointError naming the first."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = [
        f"missing {_first(missing)}" if missing else "",
        f"unexpected {_first(extra)}" if extra else "",
        f"shape mismatch (checkpoint vs model) {_first(shapes)}" if shapes else "",
    ]
    if any(problems):
        raise CheckpointError(f"{name} does not fit the model: {'; '.join(p for p in problems if p)}")


def _first(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _describe(fields: Mapping[str, int]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in fields.items())
