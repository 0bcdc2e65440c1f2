"""Both preprocessing modes against torchvision's own pipeline, on real photographs.

The reference is what a torchvision user runs: `Image.open(f).convert("RGB")` → `Resize(256, bilinear,
antialias)` → `CenterCrop(224)` → `ToTensor` → `Normalize` → torchvision's `vit_b_16` (seeded random
weights, a re-initialized head). Ours: `to_patches` → the same weights loaded into `vit/` →
`forward_patches`. The photographs are scikit-image's colour samples (shipped in its wheel), as PNG and
as JPEG q90, whole and cut to 4:3 crops.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.decode import to_patches
from vit.preprocess import patchify

tvm = pytest.importorskip("torchvision.models")
T = pytest.importorskip("torchvision.transforms")
skdata = pytest.importorskip("skimage.data")

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")


def _encode(a: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def photos() -> dict[str, bytes]:
    """Every colour photo whole (PNG and JPEG q90) and as its central 4:3 crop (JPEG q90)."""
    out = {}
    for name in PHOTOS:
        a = getattr(skdata, name)()
        h, w = a.shape[:2]
        ch, cw = (h, h * 4 // 3) if h * 4 // 3 <= w else (w * 3 // 4, w)
        top, left = (h - ch) // 2, (w - cw) // 2
        out[f"{name}.png"] = _encode(a, "PNG")
        out[f"{name}.jpg"] = _encode(a, "JPEG")
        out[f"{name}-4x3.jpg"] = _encode(np.ascontiguousarray(a[top : top + ch, left : left + cw]), "JPEG")
    return out


def reference_pixels(data: bytes) -> np.ndarray:
    tf = T.Compose([T.Resize(256, T.InterpolationMode.BILINEAR, antialias=True), T.CenterCrop(224)])
    return np.asarray(tf(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return photos()


def test_exact_mode_gives_torchvisions_pixels(images: dict[str, bytes]) -> None:
    for name, data in images.items():
        ours = to_patches(data, exact=True)
        want = patchify(reference_pixels(data), 16)
        assert np.array_equal(ours, want), name


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    """torchvision's vit_b_16 (seeded, head re-initialized) and the same weights in vit/."""
    from vit.checkpoints import load_model

    torch.manual_seed(0)
    tv = tvm.vit_b_16().eval()
    torch.manual_seed(1)
    torch.nn.init.normal_(tv.heads.head.weight, std=0.05)
    torch.nn.init.normal_(tv.heads.head.bias, std=0.05)
    path = tmp_path_factory.mktemp("weights") / "vit_b_16.pth"
    torch.save(tv.state_dict(), path)
    return tv, load_model("vit_b_16", str(path)).model.eval()


@pytest.mark.slow
def test_embeddings_of_both_modes_against_torchvision(images: dict[str, bytes], models) -> None:
    """exact: cosine ≥ 0.99999 and logits within 1e-4 of torchvision's; fast: cosine ≥ 0.998. On the 4:3
    JPEG crops (the pixel test above covers every variant; the model only turns pixels into vectors)."""
    tv, ours = models
    names = [n for n in images if n.endswith("-4x3.jpg")]
    normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ref_in = torch.stack([normalize(Image.fromarray(reference_pixels(images[n]))) for n in names])
    captured: dict[str, torch.Tensor] = {}
    hook = tv.heads.register_forward_hook(lambda _m, inputs, _o: captured.update(cls=inputs[0]))
    with torch.inference_mode():
        ref_logits = tv(ref_in)
    hook.remove()
    ref_cls = captured["cls"]
    worst = {}
    for mode in ("exact", "fast"):
        patches = np.stack([to_patches(images[n], exact=mode == "exact") for n in names])
        with torch.inference_mode():
            cls, logits = ours.forward_patches(torch.from_numpy(patches), exact=mode == "exact")
        cos = torch.nn.functional.cosine_similarity(cls, ref_cls, dim=1)
        worst[mode] = (float(cos.min()), names[int(cos.argmin())])
        if mode == "exact":
            assert float(cos.min()) >= 0.99999, worst
            assert float((logits - ref_logits).abs().max()) <= 1e-4
        else:  # (a random head's top classes are near ties: argmax is no test of the pixels)
            assert float(cos.min()) >= 0.998, worst
    print(f"worst embedding cosine against torchvision: {worst}")


def test_sample_photographs_are_jpegs_at_each_size() -> None:
    from pipeline.sample import photographs

    sizes = ((500, 375), (1024, 768))
    images = photographs(sizes)
    for w, h in sizes:
        at_size = {n: d for n, d in images.items() if n.endswith(f"-{w}x{h}.jpg")}
        assert at_size, (w, h)
        for name, data in at_size.items():
            im = Image.open(io.BytesIO(data))
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (w, h)), name
    assert len(images) == sum(n.endswith(("-500x375.jpg", "-1024x768.jpg")) for n in images)
