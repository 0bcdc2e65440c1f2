"""Parity with each library's own ViT: fp32 on CPU, random seeded weights, max |Δ| ≤ 1e-4 for logits and CLS.

Heads are re-initialized (torchvision zero-initializes its head, which would make comparing logits vacuous).
Each reference model is saved the way its library saves it and loaded back through `load_model`.
"""

from __future__ import annotations

import pathlib
from collections import OrderedDict

import pytest
import timm
import torch
import torchvision.models as tvm
from safetensors.torch import save_file
from timm.models.vision_transformer import checkpoint_filter_fn
from torchvision.models.vision_transformer import interpolate_embeddings
from transformers import ViTConfig as HFConfig
from transformers import ViTForImageClassification, ViTImageProcessor, ViTModel

from vit.checkpoints import load_model

TOL = 1e-4


def images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomize_heads(module: torch.nn.Module) -> None:
    torch.manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
            torch.nn.init.normal_(m.bias, std=0.05)


def assert_parity(
    model: torch.nn.Module, x: torch.Tensor, cls_ref: torch.Tensor, logits_ref: torch.Tensor | None
) -> None:
    with torch.no_grad():
        cls, logits = model(x)
    assert (cls - cls_ref).abs().max().item() <= TOL
    if logits_ref is None:
        assert logits is None
    else:
        assert logits is not None and logits.shape == logits_ref.shape
        assert logits_ref.abs().max() > 1e-2  # the comparison is not vacuous
        assert (logits - logits_ref).abs().max().item() <= TOL


def torchvision_outputs(tv: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    captured = {}
    hook = tv.heads.register_forward_hook(lambda _m, inputs, _o: captured.update(cls=inputs[0]))
    with torch.no_grad():
        logits = tv(x)
    hook.remove()
    return captured["cls"], logits


# --- torchvision ---


@pytest.mark.parametrize(
    ("preset", "representation_size"), [("vit_b_16", None), ("vit_b_16", 768), ("vit_b_32", None)]
)
def test_torchvision(tmp_path: pathlib.Path, preset: str, representation_size: int | None) -> None:
    torch.manual_seed(0)
    tv = getattr(tvm, preset)(representation_size=representation_size).eval()
    randomize_heads(tv.heads)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    loaded = load_model(preset, str(tmp_path / "tv.pth"))
    assert loaded.source_format == "torchvision"
    assert loaded.model.config.representation_size == representation_size
    x = images(224)
    assert_parity(loaded.model, x, *torchvision_outputs(tv, x))


def test_torchvision_load_224_run_384(tmp_path: pathlib.Path) -> None:
    shape = {
        "patch_size": 16,
        "num_layers": 12,
        "num_heads": 3,
        "hidden_dim": 192,
        "mlp_dim": 768,
    }  # vit_ti_16
    torch.manual_seed(0)
    tv224 = tvm.VisionTransformer(image_size=224, **shape, num_classes=10).eval()
    randomize_heads(tv224.heads)
    state = tv224.state_dict()
    torch.save(state, tmp_path / "tv.pth")
    tv384 = tvm.VisionTransformer(image_size=384, **shape, num_classes=10).eval()
    tv384.load_state_dict(interpolate_embeddings(384, 16, OrderedDict(state)))
    loaded = load_model("vit_ti_16", str(tmp_path / "tv.pth"), image_size=384)
    x = images(384, batch=1)
    assert_parity(loaded.model, x, *torchvision_outputs(tv384, x))


# --- timm ---


def timm_outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.forward_features(x)[:, 0], model(x)


@pytest.mark.parametrize(
    ("name", "preset", "file", "prefix"),
    [
        ("vit_base_patch16_224", "vit_b_16", "model.safetensors", ""),
        ("vit_tiny_patch16_224", "vit_ti_16", "model.safetensors", "module."),
        ("vit_tiny_patch16_224", "vit_ti_16", "pytorch_model.bin", "module._orig_mod."),
    ],
)
def test_timm(tmp_path: pathlib.Path, name: str, preset: str, file: str, prefix: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    randomize_heads(model.head)
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / file) if file.endswith(".safetensors") else torch.save(state, tmp_path / file)
    loaded = load_model(preset, str(tmp_path / file))
    assert loaded.source_format == "timm" and loaded.mean == (0.5, 0.5, 0.5)
    x = images(224)
    assert_parity(loaded.model, x, *timm_outputs(model, x))


def test_timm_load_224_run_384(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    randomize_heads(model.head)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    model384 = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=384
    ).eval()
    model384.load_state_dict(checkpoint_filter_fn(model.state_dict(), model384))  # timm's own resampling
    loaded = load_model("vit_ti_16", str(tmp_path / "model.safetensors"), image_size=384)
    x = images(384, batch=1)
    assert_parity(loaded.model, x, *timm_outputs(model384, x))


# --- Hugging Face ---

HF_TI = {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768}


def test_huggingface_classification(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    model = ViTForImageClassification(HFConfig(**HF_TI, image_size=64, num_labels=10)).eval()
    randomize_heads(model.classifier)
    model.save_pretrained(tmp_path)
    loaded = load_model("vit_ti_16", str(tmp_path))
    assert loaded.source_format == "huggingface"
    assert loaded.model.config.layer_norm_eps == 1e-12  # HF's default, not in the state dict
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.class_names is None  # LABEL_i placeholders are not names
    x = images(64)
    with torch.no_grad():
        cls, logits = model.vit(x).last_hidden_state[:, 0], model(x).logits
    assert_parity(loaded.model, x, cls, logits)
    # a run at another size resamples as HF's interpolate_pos_encoding does
    loaded128 = load_model("vit_ti_16", str(tmp_path / "model.safetensors"), image_size=128)
    x = images(128, batch=1)
    with torch.no_grad():
        cls = model.vit(x, interpolate_pos_encoding=True).last_hidden_state[:, 0]
        logits = model(x, interpolate_pos_encoding=True).logits
    assert_parity(loaded128.model, x, cls, logits)


def test_huggingface_config_eps_labels_and_preprocessor(tmp_path: pathlib.Path) -> None:
    labels = {i: f"class {i}" for i in range(3)}
    config = HFConfig(**HF_TI, image_size=32, num_labels=3, id2label=labels, layer_norm_eps=0.5)
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval()
    randomize_heads(model.classifier)
    model.save_pretrained(tmp_path)
    ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(tmp_path)
    loaded = load_model("vit_ti_16", str(tmp_path))
    assert loaded.model.config.layer_norm_eps == 0.5  # large enough that ignoring it would break parity
    assert loaded.class_names == ["class 0", "class 1", "class 2"]
    assert loaded.mean == (0.1, 0.2, 0.3) and loaded.std == (0.4, 0.5, 0.6)
    x = images(32)
    with torch.no_grad():
        cls, logits = model.vit(x).last_hidden_state[:, 0], model(x).logits
    assert_parity(loaded.model, x, cls, logits)


def test_huggingface_headless_model(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    model = ViTModel(HFConfig(**HF_TI, image_size=32)).eval()  # with its pooler, which feeds no head
    model.save_pretrained(tmp_path)
    loaded = load_model("vit_ti_16", str(tmp_path))
    assert loaded.model.config.num_classes == 0
    x = images(32)
    with torch.no_grad():
        cls = model(x).last_hidden_state[:, 0]
    assert_parity(loaded.model, x, cls, None)


def test_huggingface_heads_contradicting_preset(tmp_path: pathlib.Path) -> None:
    from vit.checkpoints import CheckpointError

    ViTModel(HFConfig(**{**HF_TI, "num_attention_heads": 6}, image_size=32)).save_pretrained(tmp_path)
    with pytest.raises(
        CheckpointError, match=r"num heads 6.*preset has .*num heads 3; no preset has this shape"
    ):
        load_model("vit_ti_16", str(tmp_path))
