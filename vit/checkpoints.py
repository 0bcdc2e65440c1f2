"""ViT weights from torchvision, timm and Hugging Face checkpoints: read safely, converted, checked, loaded.

`load_model(preset, weights)`:

1. reads the bytes through `resolve` (default: local paths, and URIs as pyarrow parses them, so `s3://`
   uses pyarrow's S3 filesystem and the usual AWS_* variables): a weights file, or a Hugging Face directory
   (config.json + model.safetensors or pytorch_model.bin);
2. deserializes without arbitrary unpickling: safetensors, or `torch.load(weights_only=True)`;
3. converts to torchvision's names and reads the architecture from the weights (`vit.convert`); the preset
   supplies only what a state dict cannot hold (number of heads) and must agree with the rest;
4. resamples the position embedding if the run's image size differs, checks every model key and shape, and
   loads with `strict=True`.

Every user-facing failure is a `CheckpointError` saying which file and what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import torch
from torch import Tensor

from vit.convert import (
    RESAMPLING,
    CheckpointError,
    check_state_dict,
    convert_state_dict,
    infer_config,
    resample_pos_embedding,
)
from vit.model import IMAGENET_MEAN, IMAGENET_STD, PRESETS, VisionTransformer

__all__ = [
    "IMAGENET_1K",
    "NO_CLASS_NAMES",
    "CheckpointError",
    "LoadedModel",
    "imagenet_class_names",
    "load_model",
    "read_class_names",
]

NO_CLASS_NAMES = "none"  # class_names=NO_CLASS_NAMES: no names, not even the checkpoint's or ImageNet's
IMAGENET_1K = "imagenet-1k"  # the source of the class names shipped with the package

HALF = (0.5, 0.5, 0.5)
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")  # training checkpoints nest the weights

# --- reading files (local or s3://) ---


Resolver = Callable[[str], tuple[Any, str]]  # location → (pyarrow filesystem, path in it)


_SEEDED_BUILD = threading.Lock()  # one seeded random-weights build at a time in a process (load_model)


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
    class_names_source: str | None = None  # "given", "checkpoint" or IMAGENET_1K

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
        # torch's initializers draw from its one global generator: two threads building seeded models at
        # once would interleave their draws, and each get weights of neither seed.
        with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VisionTransformer(config, mean_, std_).eval()
        given = class_names if class_names and class_names != NO_CLASS_NAMES else None
        names = read_class_names(given, config.num_classes, resolve) if given else None
        source = "given" if names else None
        return LoadedModel(model, preset, "random", None, "random", mean_, std_, names, seed, source)

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

    names, source = _class_names(class_names, hf, config.num_classes, resolve)
    sha = hashlib.sha256(files.data).hexdigest()
    return LoadedModel(model.eval(), preset, weights, sha, fmt, mean_, std_, names, None, source)


def _class_names(
    given: str | None, hf_config: dict[str, Any] | None, num_classes: int, resolve: Resolver
) -> tuple[list[str] | None, str | None]:
    """The names of a checkpoint's classes and where they come from: the file `given` (NO_CLASS_NAMES:
    none), else the checkpoint's own (a Hugging Face config's id2label), else ImageNet-1k's for a
    1,000-class head (what torchvision's and timm's ImageNet checkpoints are)."""
    if given == NO_CLASS_NAMES:
        return None, None
    if given:
        return read_class_names(given, num_classes, resolve), "given"
    names = _hf_labels(hf_config, num_classes)
    if names:
        return names, "checkpoint"
    if num_classes == len(imagenet_class_names()):
        return list(imagenet_class_names()), IMAGENET_1K
    return None, None


@cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names in class-index order (torchvision's short names), shipped with
    the package: the default names of a 1,000-class checkpoint without names of its own."""
    text = resources.files("vit").joinpath("imagenet1k_classes.txt").read_text("utf-8")
    return tuple(text.rstrip("\n").split("\n"))


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
