"""ViT weights from torchvision, timm and Hugging Face checkpoints: read safely, converted by table, checked.

`load_model(preset, weights)` is the entry point:

1. read the bytes: a local file, a local Hugging Face directory (config.json + model.safetensors or
   pytorch_model.bin), or the same on `s3://` (pyarrow's S3 filesystem, so the usual AWS_* variables apply);
2. deserialize without arbitrary unpickling: safetensors, or `torch.load(weights_only=True)`;
3. `convert_state_dict`: strip `module.` / `_orig_mod.` prefixes, detect the source from tell-tale keys and
   rename to torchvision's names by table (Hugging Face's split q/k/v are fused), every source key used once;
4. `infer_config`: the checkpoint determines width, depth, MLP width, patch size, grid, classes and
   pre_logits; the preset supplies only what a state dict cannot hold (number of heads) and must agree
   with the rest;
5. resample the position embedding if the run's image size differs, check every model key and shape, and
   load with `strict=True`.

Every user-facing failure is a `CheckpointError` saying which file and what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vit.model import IMAGENET_MEAN, IMAGENET_STD, PRESETS, VisionTransformer, ViTConfig

SOURCE_FORMATS = ("torchvision", "timm", "huggingface")
HALF = (0.5, 0.5, 0.5)
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")  # training checkpoints nest the weights


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what to do."""


# --- rename tables: (pattern for a whole source key, torchvision name, part of a fused q;k;v or None) ---

_LAYER = r"encoder.layers.encoder_layer_\1"
Rename = tuple[str, str, int | None]

TORCHVISION_RENAMES: list[Rename] = [
    (r"(.+\.mlp)\.linear_1\.(weight|bias)", r"\1.0.\2", None),  # torchvision < 0.13
    (r"(.+\.mlp)\.linear_2\.(weight|bias)", r"\1.3.\2", None),
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


# --- pure functions on state dicts ---


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


# --- reading files (local or s3://) ---


Resolver = Callable[[str], tuple[Any, str]]  # location → (pyarrow filesystem, path in it)


def _filesystem(uri: str) -> tuple[Any, str]:
    """The default resolver: local paths, and URIs as pyarrow parses them. Callers that need literal S3
    keys or their own S3 settings pass theirs (the pipeline passes pipeline.storage.resolve_uri)."""
    from pyarrow import fs  # imported lazily: only s3:// (or other URI) weights need it

    if "://" in uri:
        return fs.FileSystem.from_uri(uri)
    return fs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


@dataclass
class _Files:
    data: bytes  # the weights file
    path: str
    hf_config: dict[str, Any] | None = None  # config.json next to it
    preprocessor: dict[str, Any] | None = None  # preprocessor_config.json next to it


def _read_files(weights: str, resolve: Resolver = _filesystem) -> _Files:
    from pyarrow import fs

    try:
        filesystem, path = resolve(weights)
        info = filesystem.get_file_info(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot open weights {weights!r} ({e}); pass a local path, an s3:// URI or 'random'"
        ) from e
    if info.type == fs.FileType.NotFound:
        raise CheckpointError(
            f"weights {weights!r} not found; pass an existing file or directory, or 'random'"
        )
    directory = path if info.type == fs.FileType.Directory else os.path.dirname(path)

    def sibling(file_name: str) -> bytes | None:
        p = f"{directory.rstrip('/')}/{file_name}"
        if filesystem.get_file_info(p).type != fs.FileType.File:
            return None
        with filesystem.open_input_stream(p) as f:
            return f.read()

    if info.type == fs.FileType.Directory:
        path = next((f"{path.rstrip('/')}/{n}" for n in HF_WEIGHT_FILES if sibling(n) is not None), "")
        if not path:
            sharded = sibling("model.safetensors.index.json") is not None
            raise CheckpointError(
                f"{weights!r} is a directory without {' or '.join(HF_WEIGHT_FILES)}"
                + ("; sharded checkpoints are not supported, save it unsharded" if sharded else "")
            )
    with filesystem.open_input_stream(path) as f:
        data = f.read()
    configs = [sibling(n) for n in ("config.json", "preprocessor_config.json")]
    hf_config, preprocessor = (json.loads(c) if c else None for c in configs)
    return _Files(data, path, hf_config, preprocessor)


def _is_safetensors(data: bytes, path: str) -> bool:
    """By extension, or by the magic: a little-endian u64 header length, then the header's JSON `{`."""
    return path.lower().endswith(".safetensors") or (len(data) > 8 and data[8:9] == b"{")


def _load_safetensors(data: bytes, name: str) -> dict[str, Tensor]:
    """safetensors bytes → tensors; a CheckpointError saying whether the file is truncated or not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    again = "copy or download it again, or pass another file"
    header_len = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if len(data) < 8 or data[8:9] != b"{":
        raise CheckpointError(
            f"{name} is not a valid safetensors file: it does not start with a safetensors header "
            f"({len(data)} bytes, starting {data[:8]!r}); {again}"
        )
    if len(data) < 8 + header_len:
        raise CheckpointError(
            f"{name} is truncated: its safetensors header alone should be {header_len} bytes but the file "
            f"has {len(data)}; {again}"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{name} is not a valid safetensors file (bad header: {e}); {again}") from e
    if len(data) < 8 + header_len + end:
        raise CheckpointError(
            f"{name} is truncated: it should be {8 + header_len + end} bytes but has {len(data)}; {again}"
        )
    try:
        return load(data)
    except SafetensorError as e:
        raise CheckpointError(f"{name} is not a valid safetensors file ({e}); {again}") from e


def _deserialize(data: bytes, name: str, path: str = "") -> dict[str, Tensor]:
    """The state dict in a weights file: safetensors by extension or magic, else a weights-only pickle."""
    if _is_safetensors(data, path):
        return _load_safetensors(data, name)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not culprit and not data.startswith((b"PK\x03\x04", b"\x80")):  # neither torch's zip nor a pickle
            raise CheckpointError(
                f"{name} is not a safetensors or PyTorch checkpoint file ({len(data)} bytes, starting "
                f"{data[:8]!r}); pass a .safetensors, .pth or .bin file, or a Hugging Face directory"
            ) from e
        reason = (
            f"it pickles {culprit.group(1)}"
            if culprit
            else "it is neither safetensors nor a weights-only pickle"
        )
        raise CheckpointError(
            f"{name} was refused because {reason}, and arbitrary unpickling is unsafe; if you trust it, "
            'convert it once: python -c "import torch, safetensors.torch as st; '
            "sd = torch.load('IN', weights_only=False); sd = sd.get('model', sd); "
            "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\""
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{name} is not a readable safetensors or PyTorch file ({e})") from e
    for _ in range(2):  # {"model": {...}} or {"state_dict": {...}} from training loops
        if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
            obj = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), obj)
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{name} holds no state dict of tensors; save model.state_dict() (safetensors preferred)"
        )
    return dict(obj)


def read_class_names(path: str, num_classes: int, resolve: Resolver = _filesystem) -> list[str]:
    """One name per line, or a JSON list; the count must equal the model's number of classes."""
    try:
        filesystem, p = resolve(path)
        with filesystem.open_input_stream(p) as f:
            text = f.read().decode("utf-8")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read class names from {path!r} ({e}); pass a text or JSON file") from e
    if text.lstrip().startswith("["):
        names = [str(n) for n in json.loads(text)]
    else:
        names = [line.strip() for line in text.rstrip("\n").split("\n")]
    if len(names) != num_classes:
        raise CheckpointError(
            f"{path!r} has {len(names)} class names but the model has {num_classes} classes"
        )
    return names


# --- the entry point ---


@dataclass
class LoadedModel:
    model: VisionTransformer
    preset: str
    weights: str  # the source path or URI as given, or "random"
    sha256: str | None  # of the weights file; None for random weights
    source_format: str  # "torchvision" | "timm" | "huggingface" | "random"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: list[str] | None
    seed: int | None

    def identity(self) -> dict[str, str]:
        """What produced the outputs, as flat strings (recorded in the Parquet footer)."""
        c = self.model.config
        ident = {
            "preset": self.preset,
            "weights": self.weights,
            "sha256": self.sha256 or "random",
            "source_format": self.source_format,
            "image_size": str(c.image_size),
            "patch_size": str(c.patch_size),
            "hidden_dim": str(c.hidden_dim),
            "num_classes": str(c.num_classes),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
        }
        if self.source_format == "random":
            ident["seed"] = str(self.seed)
        return ident


def load_model(
    preset: str,
    weights: str,
    *,
    image_size: int | None = None,
    seed: int = 0,
    class_names: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resolve: Resolver = _filesystem,
) -> LoadedModel:
    """Loads `weights` (a path, a Hugging Face directory, an s3:// URI, or "random") into a `preset` model.
    `resolve` opens `weights` and `class_names` (default: local paths and pyarrow's URIs).

    `image_size` is the run's size (default: the checkpoint's); a different grid resamples the position
    embedding. `mean`/`std` default to what the source's preprocessing uses (ImageNet for torchvision and
    random weights, 0.5 for timm ViTs, preprocessor_config.json or 0.5 for Hugging Face).
    """
    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    patch = PRESETS[preset].patch_size  # a checkpoint's patch size must equal its preset's
    if image_size is not None and (image_size < 1 or image_size % patch):
        raise CheckpointError(
            f"image size {image_size} is not a multiple of the patch size {patch} of {preset} or not "
            f"positive; use e.g. {max(1, round(image_size / patch)) * patch}"
        )
    if weights == "random":
        config = (
            PRESETS[preset]
            if image_size is None
            else dataclasses.replace(PRESETS[preset], image_size=image_size)
        )
        mean_, std_ = _triple(mean, IMAGENET_MEAN), _triple(std, IMAGENET_STD)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VisionTransformer(config, mean_, std_).eval()
        names = read_class_names(class_names, config.num_classes, resolve) if class_names else None
        return LoadedModel(model, preset, "random", None, "random", mean_, std_, names, seed)

    files = _read_files(weights, resolve)
    name = repr(weights)
    file_name = (
        name
        if os.path.basename(files.path) in weights
        else repr(f"{weights.rstrip('/')}/{os.path.basename(files.path)}")
    )
    sd, fmt = convert_state_dict(_deserialize(files.data, file_name, files.path), name=name)
    hf = files.hf_config if fmt == "huggingface" else None
    eps, heads = 1e-6, None
    if fmt == "huggingface":
        hf = hf or {}
        if hf.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(
                f"{name} uses hidden_act={hf['hidden_act']!r}; only exact GELU ViTs are supported"
            )
        eps, heads = float(hf.get("layer_norm_eps", 1e-12)), hf.get("num_attention_heads")
    config = infer_config(sd, preset, layer_norm_eps=eps, num_heads=heads, name=name)
    if image_size is not None and image_size != config.image_size:
        if image_size % config.patch_size:
            raise CheckpointError(
                f"image_size {image_size} is not a multiple of the patch size {config.patch_size}"
            )
        pos = sd["encoder.pos_embedding"]
        sd["encoder.pos_embedding"] = resample_pos_embedding(
            pos, image_size // config.patch_size, **RESAMPLING[fmt]
        )
        config = dataclasses.replace(config, image_size=image_size)

    pre = files.preprocessor or {}
    default_mean, default_std = {
        "torchvision": (IMAGENET_MEAN, IMAGENET_STD),
        "timm": (HALF, HALF),
        "huggingface": (pre.get("image_mean", HALF), pre.get("image_std", HALF)),
    }[fmt]
    mean_, std_ = _triple(mean, default_mean), _triple(std, default_std)
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        model = VisionTransformer(config, mean_, std_)
    check_state_dict(sd, model, name=name)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.set_normalization(mean_, std_)

    names = (
        read_class_names(class_names, config.num_classes, resolve)
        if class_names
        else _hf_labels(hf, config.num_classes)
    )
    sha = hashlib.sha256(files.data).hexdigest()
    return LoadedModel(model.eval(), preset, weights, sha, fmt, mean_, std_, names, None)


def _hf_labels(hf_config: dict[str, Any] | None, num_classes: int) -> list[str] | None:
    """Class names from a Hugging Face config's id2label, unless they are the LABEL_i placeholders."""
    id2label = (hf_config or {}).get("id2label") or {}
    names = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_classes)]
    if not num_classes or len(id2label) != num_classes or names == [f"LABEL_{i}" for i in range(num_classes)]:
        return None
    return names


def _triple(values: Sequence[float] | None, default: Sequence[float]) -> tuple[float, float, float]:
    v = tuple(float(x) for x in (default if values is None else values))
    if len(v) != 3:
        raise CheckpointError(f"mean and std need 3 values (R, G, B), got {list(v)}")
    return v  # type: ignore[return-value]


def _first(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _describe(fields: Mapping[str, int]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in fields.items())
