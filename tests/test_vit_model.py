"""vit/model.py and vit/preprocess.py: torchvision's names and shapes, the uint8-patch path, helpers, no Ray
under vit/."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
import torch
import torchvision.models as tvm

from vit.model import (
    IMAGENET_MEAN,
    PRESETS,
    VisionTransformer,
    ViTConfig,
    autocast,
    build_model,
    compile_model,
)
from vit.preprocess import patchify

VIT_DIR = pathlib.Path(__file__).resolve().parents[1] / "vit"
TORCHVISION_BUILDERS = ["vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"]
SMALL = {
    "num_layers": 2,
    "hidden_dim": 64,
    "num_heads": 4,
    "mlp_dim": 128,
}  # for tests about wiring, not size


def small_model(preset: str = "vit_ti_16", **overrides: object) -> VisionTransformer:
    torch.manual_seed(0)
    model = build_model(preset, **{**SMALL, **overrides}).eval()
    with torch.no_grad():  # no zeros anywhere, so every term of every path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("preset", TORCHVISION_BUILDERS)
def test_presets_have_torchvisions_names_and_shapes(preset: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        ours = build_model(preset).state_dict()
        theirs = getattr(tvm, preset)().state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_small_presets() -> None:
    ti, s = PRESETS["vit_ti_16"], PRESETS["vit_s_16"]
    assert (ti.hidden_dim, ti.num_layers, ti.num_heads, ti.mlp_dim) == (192, 12, 3, 768)
    assert (s.hidden_dim, s.num_layers, s.num_heads, s.mlp_dim) == (384, 12, 6, 1536)
    with torch.device("meta"):
        assert sum(p.numel() for p in build_model("vit_ti_16").parameters()) == 5_717_416  # timm's vit_tiny


def test_gmacs_match_torchvision() -> None:
    assert PRESETS["vit_b_16"].gmacs() == pytest.approx(17.564, abs=1e-3)  # torchvision's _ops
    assert PRESETS["vit_l_16"].gmacs() == pytest.approx(61.555, abs=1e-3)
    assert PRESETS["vit_b_32"].gmacs() == pytest.approx(4.409, abs=1e-3)


def test_torchvision_state_dict_loads_strict() -> None:
    tv = tvm.VisionTransformer(32, 16, 2, 4, 64, 128, num_classes=5, representation_size=8)
    model = VisionTransformer(ViTConfig(32, 16, 2, 4, 64, 128, num_classes=5, representation_size=8))
    model.load_state_dict(tv.state_dict(), strict=True)
    assert "pixel_mean" not in model.state_dict() and "pixel_std" not in model.state_dict()


def test_legacy_mlp_keys_load_strict() -> None:
    model = small_model()
    legacy = {
        re.sub(r"mlp\.([03])\.", lambda m: f"mlp.linear_{int(m[1]) // 3 + 1}.", k): v
        for k, v in model.state_dict().items()
    }
    assert any("mlp.linear_1." in k for k in legacy) and not any(".mlp.0." in k for k in legacy)
    fresh = build_model("vit_ti_16", **SMALL)
    fresh.load_state_dict(legacy, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


@pytest.mark.parametrize(
    ("preset", "mean", "std"),
    [
        ("vit_ti_16", None, None),
        ("vit_b_32", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ("vit_h_14", (0.1, 0.7, 0.3), (0.2, 0.9, 0.4)),
    ],
)
def test_uint8_patches_equal_float_images(preset: str, mean: tuple | None, std: tuple | None) -> None:
    model = small_model(preset, image_size=PRESETS[preset].patch_size * 4, num_classes=7)
    if mean is not None:
        model.set_normalization(mean, std)
    size, P = model.config.image_size, model.config.patch_size
    images = torch.randint(
        0, 256, (3, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    normalized = ((images.float() / 255 - model.pixel_mean) / model.pixel_std).permute(
        0, 3, 1, 2
    )  # torchvision
    with torch.no_grad():
        cls_f, logits_f = model(normalized)
        cls_u, logits_u = model.forward_patches(patchify(images, P))
    assert cls_u.shape == (3, 64) and logits_u.shape == (3, 7)
    assert (cls_u - cls_f).abs().max() <= 1e-5
    assert (logits_u - logits_f).abs().max() <= 1e-5


def test_patchify_layout() -> None:
    images = torch.arange(2 * 4 * 6 * 3).reshape(2, 4, 6, 3)
    patches = patchify(images, 2)  # grid 2 × 3
    assert patches.shape == (2, 6, 12)
    # patch 4 = grid row 1, column 1: pixels rows 2–3, columns 2–3, laid out (kh, kw, c)
    assert torch.equal(patches[1, 4], images[1, 2:4, 2:4, :].reshape(-1))


def test_headless_model_and_shape_checks() -> None:
    model = small_model(num_classes=0, image_size=32)
    cls, logits = model(torch.randn(2, 3, 32, 32))
    assert cls.shape == (2, 64) and logits is None
    assert len(model.heads) == 0
    with pytest.raises(AssertionError, match=r"expected images"):
        model(torch.randn(2, 3, 48, 48))
    with pytest.raises(AssertionError, match=r"expected patches"):
        model.forward_patches(torch.zeros(2, 5, 768, dtype=torch.uint8))


def test_config_validation_and_build_errors() -> None:
    with pytest.raises(ValueError, match=r"multiple of patch_size"):
        ViTConfig(image_size=100)
    with pytest.raises(ValueError, match=r"divisible by num_heads"):
        ViTConfig(hidden_dim=100, num_heads=3)
    with pytest.raises(ValueError, match=r"unknown preset"):
        build_model("vit_x_99")
    assert build_model("vit_ti_16", image_size=32, num_classes=3, num_layers=1).config == ViTConfig(
        image_size=32, num_layers=1, num_heads=3, hidden_dim=192, mlp_dim=768, num_classes=3
    )
    assert build_model("vit_ti_16", image_size=32, num_layers=1).config.layer_norm_eps == 1e-6
    assert tuple(build_model("vit_ti_16", num_layers=1).pixel_mean.tolist()) == pytest.approx(IMAGENET_MEAN)


def test_random_heads_are_not_zero() -> None:
    # torchvision zero-initializes its head; ours is random so dry runs give distinct logits
    model = build_model("vit_ti_16", **SMALL, image_size=32)
    _, logits = model(torch.randn(2, 3, 32, 32))
    assert logits is not None and logits.abs().max() > 0


def test_autocast_helper() -> None:
    assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu"):  # fp32 on CPU by default
        assert not torch.is_autocast_enabled("cpu")
    model = small_model(image_size=32)
    with autocast("cpu", "bf16"), torch.no_grad():
        cls, logits = model.forward_patches(torch.randint(0, 256, (2, 4, 768), dtype=torch.uint8))
    assert logits is not None and logits.dtype == torch.bfloat16 and torch.isfinite(cls).all()
    with pytest.raises(ValueError, match=r"'fp32' or 'bf16'"):
        autocast("cpu", "fp16")


def test_compile_model_wraps_both_entry_points() -> None:
    model = small_model(image_size=32)
    patches = torch.randint(0, 256, (2, 4, 768), dtype=torch.uint8)
    with torch.no_grad():
        expected = model.forward_patches(patches)
        compile_model(
            model, backend="eager"
        )  # the wiring; inductor itself is exercised by benchmarks/model.py
        got = model.forward_patches(patches)
        got_images = model(torch.randn(1, 3, 32, 32))
    assert torch.equal(got[0], expected[0])
    assert got_images[0].shape == (1, 64)


def test_vit_imports_no_ray() -> None:
    for path in VIT_DIR.rglob("*.py"):
        assert not re.search(r"^\s*(import ray|from ray)\b", path.read_text(), re.M), path
    code = "import sys, vit, vit.model, vit.checkpoints; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=VIT_DIR.parent)
