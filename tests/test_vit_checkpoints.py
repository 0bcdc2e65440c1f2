"""vit/convert.py, vit/checkpoints.py: rename tables, count checks, safe loading, presets vs checkpoints,
identity, S3."""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from vit.checkpoints import CheckpointError, load_model
from vit.convert import (
    check_state_dict,
    convert_state_dict,
    detect_format,
    infer_config,
    resample_pos_embedding,
    strip_prefixes,
)
from vit.model import IMAGENET_MEAN, IMAGENET_STD, build_model

TI = {"image_size": 32, "num_classes": 4}  # vit_ti_16's shape on a 2×2 grid: small and fast


@pytest.fixture(scope="module")
def ti_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("vit_ti_16", **TI).state_dict()


def save_pth(path: pathlib.Path, obj: object) -> str:
    torch.save(obj, path)
    return str(path)


def outputs(model: torch.nn.Module, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.config.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


def as_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (torchvision) names → timm's, by hand, to test the table independently."""
    out = {"cls_token": sd["class_token"], "pos_embed": sd["encoder.pos_embedding"]}
    out |= {f"patch_embed.proj.{t}": sd[f"conv_proj.{t}"] for t in ("weight", "bias")}
    out |= {f"norm.{t}": sd[f"encoder.ln.{t}"] for t in ("weight", "bias")}
    out |= {f"head.{t}": sd[f"heads.head.{t}"] for t in ("weight", "bias")}
    for i in range(12):
        p = f"encoder.layers.encoder_layer_{i}."
        for t in ("weight", "bias"):
            out |= {
                f"blocks.{i}.norm1.{t}": sd[p + f"ln_1.{t}"],
                f"blocks.{i}.attn.qkv.{t}": sd[p + f"self_attention.in_proj_{t}"],
                f"blocks.{i}.attn.proj.{t}": sd[p + f"self_attention.out_proj.{t}"],
                f"blocks.{i}.norm2.{t}": sd[p + f"ln_2.{t}"],
                f"blocks.{i}.mlp.fc1.{t}": sd[p + f"mlp.0.{t}"],
                f"blocks.{i}.mlp.fc2.{t}": sd[p + f"mlp.3.{t}"],
            }
    return out


# --- pure functions ---


def test_strip_prefixes() -> None:
    sd = {"module._orig_mod.a": 1, "module._orig_mod.b": 2}
    assert strip_prefixes(sd) == {"a": 1, "b": 2}  # type: ignore[arg-type]
    assert strip_prefixes({"module.a": 1, "b": 2}) == {"module.a": 1, "b": 2}  # type: ignore[arg-type]


def test_detect_format(ti_state: dict) -> None:
    assert detect_format(ti_state) == "torchvision"
    assert detect_format(as_timm(ti_state)) == "timm"
    assert (
        detect_format({"vit.embeddings.patch_embeddings.projection.weight": torch.zeros(1)}) == "huggingface"
    )
    with pytest.raises(CheckpointError, match=r"cannot tell which library.*resnet.conv1.weight"):
        detect_format({"resnet.conv1.weight": torch.zeros(1)})


def test_timm_table_round_trip(ti_state: dict) -> None:
    converted, fmt = convert_state_dict({f"_orig_mod.{k}": v for k, v in as_timm(ti_state).items()})
    assert fmt == "timm"
    assert converted.keys() == ti_state.keys()
    assert all(converted[k] is ti_state[k] for k in ti_state)


def test_unknown_key_is_named(ti_state: dict) -> None:
    sd = as_timm(ti_state) | {"fc_norm.weight": torch.zeros(192), "reg_token": torch.zeros(1, 4, 192)}
    with pytest.raises(
        CheckpointError, match=r"ckpt.pth: 2 timm keys have no ViT counterpart: fc_norm.weight, reg_token"
    ):
        convert_state_dict(sd, name="ckpt.pth")


def test_colliding_keys_are_named(ti_state: dict) -> None:
    sd = dict(ti_state)
    sd["encoder.layers.encoder_layer_0.mlp.linear_1.weight"] = sd[
        "encoder.layers.encoder_layer_0.mlp.0.weight"
    ]
    with pytest.raises(
        CheckpointError, match=r"several keys map to one parameter: .*mlp.0.weight and .*linear_1.weight"
    ):
        convert_state_dict(sd)


def test_huggingface_qkv_fused_and_checked() -> None:
    q, k, v = (torch.full((4, 4), float(i)) for i in range(3))
    base = "vit.encoder.layer.0.attention.attention."
    sd = {
        "vit.embeddings.patch_embeddings.projection.weight": torch.zeros(4, 3, 2, 2),
        base + "query.weight": q,
        base + "key.weight": k,
        base + "value.weight": v,
    }
    out, fmt = convert_state_dict(sd)
    assert fmt == "huggingface"
    assert torch.equal(
        out["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"], torch.cat([q, k, v])
    )
    del sd[base + "key.weight"]
    with pytest.raises(CheckpointError, match=r"in_proj_weight lacks its key part"):
        convert_state_dict(sd)


def test_check_state_dict_names_offenders(ti_state: dict) -> None:
    model = build_model("vit_ti_16", **TI)
    sd = dict(ti_state)
    del sd["encoder.ln.bias"]
    sd["heads.head.weight"] = torch.zeros(5, 192)
    sd["extra.thing"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        check_state_dict(sd, model, name="x.pth")
    msg = str(err.value)
    assert "missing encoder.ln.bias" in msg and "unexpected extra.thing" in msg
    assert "heads.head.weight (5, 192) vs (4, 192)" in msg


def test_infer_config_reads_the_checkpoint(ti_state: dict) -> None:
    config = infer_config(ti_state, "vit_ti_16")
    assert (config.image_size, config.num_classes, config.num_heads, config.representation_size) == (
        32,
        4,
        3,
        None,
    )


def test_resample_keeps_class_token() -> None:
    pos = torch.randn(1, 1 + 4, 8)
    out = resample_pos_embedding(pos, 3)
    assert out.shape == (1, 10, 8) and torch.equal(out[:, 0], pos[:, 0])
    assert torch.allclose(resample_pos_embedding(pos, 2), pos)


# --- load_model ---


def test_load_torchvision_file(tmp_path: pathlib.Path, ti_state: dict) -> None:
    path = save_pth(tmp_path / "vit.pth", ti_state)
    loaded = load_model("vit_ti_16", path)
    assert loaded.source_format == "torchvision" and loaded.seed is None
    assert loaded.sha256 == hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
    assert (loaded.mean, loaded.std) == (IMAGENET_MEAN, IMAGENET_STD)
    reference = build_model("vit_ti_16", **TI).eval()
    reference.load_state_dict(ti_state)
    for a, b in zip(outputs(loaded.model), outputs(reference), strict=True):
        assert torch.equal(a, b)
    ident = loaded.identity()
    assert ident == {
        "preset": "vit_ti_16",
        "weights": path,
        "sha256": loaded.sha256,
        "source_format": "torchvision",
        "image_size": "32",
        "patch_size": "16",
        "hidden_dim": "192",
        "num_classes": "4",
        "mean": json.dumps(list(IMAGENET_MEAN)),
        "std": json.dumps(list(IMAGENET_STD)),
    }


def test_legacy_keys_wrapped_and_half_precision(tmp_path: pathlib.Path, ti_state: dict) -> None:
    legacy = {
        k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v.half()
        for k, v in ti_state.items()
    }
    path = save_pth(tmp_path / "legacy.pth", {"model": legacy, "epoch": 3})  # a training checkpoint
    model = load_model("vit_ti_16", path).model
    assert model.encoder.layers[0].mlp[0].weight.dtype == torch.float32
    assert torch.equal(
        model.state_dict()["encoder.layers.encoder_layer_0.mlp.3.bias"],
        legacy["encoder.layers.encoder_layer_0.mlp.linear_2.bias"].float(),
    )


class Arbitrary:
    pass


@pytest.mark.parametrize("extra", [argparse.Namespace(lr=0.1), Arbitrary()])
def test_arbitrary_pickle_is_refused(tmp_path: pathlib.Path, ti_state: dict, extra: object) -> None:
    path = save_pth(tmp_path / "train.pth", {"model": ti_state, "args": extra})
    with pytest.raises(
        CheckpointError, match=r"train.pth.* refused because it pickles .*(Namespace|Arbitrary).*safetensors"
    ):
        load_model("vit_ti_16", path)


def test_garbage_and_missing_files(tmp_path: pathlib.Path) -> None:
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match=r"junk.bin"):
        load_model("vit_ti_16", str(tmp_path / "junk.bin"))
    with pytest.raises(CheckpointError, match=r"nope.pth.* not found.*'random'"):
        load_model("vit_ti_16", str(tmp_path / "nope.pth"))  # never a silent fallback to random weights
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match=r"directory without model.safetensors"):
        load_model("vit_ti_16", str(tmp_path / "empty_dir"))
    with pytest.raises(CheckpointError, match=r"unknown preset 'vit_q_16'"):
        load_model("vit_q_16", "random")


def test_wrong_preset_is_refused_naming_both(tmp_path: pathlib.Path, ti_state: dict) -> None:
    path = save_pth(tmp_path / "tiny.pth", ti_state)
    with pytest.raises(CheckpointError) as err:
        load_model("vit_b_16", path)
    msg = str(err.value)
    assert "tiny.pth" in msg and "preset 'vit_b_16'" in msg and "use preset 'vit_ti_16'" in msg
    assert "hidden dim 192" in msg and "hidden dim 768" in msg


def test_timm_defaults_and_overrides(tmp_path: pathlib.Path, ti_state: dict) -> None:
    path = tmp_path / "timm.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in as_timm(ti_state).items()}, path)
    loaded = load_model("vit_ti_16", str(path))
    assert loaded.source_format == "timm" and loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.5, 0.5, 0.5)
    assert loaded.model.pixel_mean.tolist() == [0.5, 0.5, 0.5]
    loaded = load_model("vit_ti_16", str(path), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert loaded.mean == IMAGENET_MEAN and loaded.model.pixel_std.tolist() == pytest.approx(IMAGENET_STD)


def test_image_size_resamples(tmp_path: pathlib.Path, ti_state: dict) -> None:
    path = save_pth(tmp_path / "vit.pth", ti_state)
    loaded = load_model("vit_ti_16", path, image_size=64)
    assert loaded.model.config.image_size == 64 and loaded.model.encoder.pos_embedding.shape == (1, 17, 192)
    assert loaded.identity()["image_size"] == "64"
    with pytest.raises(CheckpointError, match=r"not a multiple of the patch size 16"):
        load_model("vit_ti_16", path, image_size=40)


def test_random_weights_are_seeded_and_marked() -> None:
    a, b, c = (load_model("vit_ti_16", "random", image_size=32, seed=s) for s in (7, 7, 8))
    assert torch.equal(outputs(a.model)[1], outputs(b.model)[1])
    assert not torch.equal(outputs(a.model)[1], outputs(c.model)[1])
    assert outputs(a.model)[1].abs().max() > 0
    ident = a.identity()
    assert ident["weights"] == "random" and ident["sha256"] == "random" and ident["source_format"] == "random"
    assert ident["seed"] == "7" and ident["num_classes"] == "1000"
    assert all(isinstance(v, str) for v in ident.values())


def test_class_names(tmp_path: pathlib.Path, ti_state: dict) -> None:
    path = save_pth(tmp_path / "vit.pth", ti_state)
    (tmp_path / "names.txt").write_text("cat\ndog\ntench\ngolden retriever\n")
    (tmp_path / "names.json").write_text(json.dumps(["a", "b", "c", "d"]))
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    assert load_model("vit_ti_16", path, class_names=str(tmp_path / "names.txt")).class_names == [
        "cat",
        "dog",
        "tench",
        "golden retriever",
    ]
    assert load_model("vit_ti_16", path, class_names=str(tmp_path / "names.json")).class_names == list("abcd")
    with pytest.raises(CheckpointError, match=r"three.txt' has 3 class names but the model has 4"):
        load_model("vit_ti_16", path, class_names=str(tmp_path / "three.txt"))


def test_default_class_names(tmp_path: pathlib.Path) -> None:
    """A 1,000-class checkpoint without names of its own gets ImageNet-1k's (shipped, torchvision's
    order); `none` turns names off; random weights get none unless given; other class counts get none."""
    from vit.checkpoints import IMAGENET_1K, NO_CLASS_NAMES, imagenet_class_names

    names = imagenet_class_names()
    assert len(names) == 1000 == len(set(names)) and names[:2] == ("tench", "goldfish")
    torch.manual_seed(0)
    path = save_pth(tmp_path / "vit.pth", build_model("vit_ti_16", image_size=32).state_dict())
    loaded = load_model("vit_ti_16", path)
    assert loaded.class_names == list(names) and loaded.class_names_source == IMAGENET_1K
    assert load_model("vit_ti_16", path, class_names=NO_CLASS_NAMES).class_names is None
    assert load_model("vit_ti_16", "random", image_size=32).class_names is None
    four = save_pth(tmp_path / "four.pth", build_model("vit_ti_16", **TI).state_dict())
    assert load_model("vit_ti_16", four).class_names is None


@pytest.mark.integration
def test_load_from_s3(s3_bucket: str, tmp_path: pathlib.Path, ti_state: dict) -> None:
    import boto3

    path = tmp_path / "vit.safetensors"
    save_file(ti_state, path)
    s3 = boto3.client("s3")
    s3.upload_file(str(path), s3_bucket, "models/vit.safetensors")
    s3.put_object(Bucket=s3_bucket, Key="models/names.txt", Body=b"a\nb\nc\nd\n")
    uri = f"s3://{s3_bucket}/models/vit.safetensors"
    loaded = load_model("vit_ti_16", uri, class_names=f"s3://{s3_bucket}/models/names.txt")
    assert loaded.weights == uri and loaded.class_names == list("abcd")
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    local = load_model("vit_ti_16", str(path))
    assert torch.equal(outputs(loaded.model)[1], outputs(local.model)[1])
    with pytest.raises(CheckpointError, match=r"not found"):
        load_model("vit_ti_16", f"s3://{s3_bucket}/models/missing.safetensors")


def test_seeded_random_weights_are_the_same_when_built_in_threads_at_once() -> None:
    """Seeded random weights draw from torch's global generator: builds in parallel threads (the job
    loads the weights in a thread while it lists the input; Daft builds a UDF's model in several) must each
    get their seed's weights."""
    from concurrent.futures import ThreadPoolExecutor

    alone = load_model("vit_ti_16", "random", seed=0).model.state_dict()
    with ThreadPoolExecutor(4) as pool:
        built = list(pool.map(lambda s: load_model("vit_ti_16", "random", seed=s % 2).model, range(4)))
    for i, model in enumerate(built):
        same = all(torch.equal(v, alone[k]) for k, v in model.state_dict().items())
        assert same == (i % 2 == 0), f"build {i} (seed {i % 2})"
