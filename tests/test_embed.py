"""The embed stage's batch function, without a cluster."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pipeline.embed as embed_module
from pipeline.embed import MIN_PIECE_ROWS, EmbedPatches, FakeEmbedPatches, ModelSpec

SPEC = ModelSpec(preset="vit_ti_16", weights="random", image_size=32, seed=3)


def _batch(n: int, bad: set[int], patches_shape=(4, 768)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "shard": np.array(["s"] * n, dtype=object),
        "patches": rng.integers(0, 256, (n, *patches_shape), dtype=np.uint8),
        "error": np.array([f"decode: broken {i}" if i in bad else None for i in range(n)], dtype=object),
    }


def test_embed_matches_the_model_and_passes_errors_through():
    stage = EmbedPatches(SPEC, device="cpu", cpu_threads=1)
    batch = _batch(5, bad={1, 3})
    out = stage(batch)
    assert list(out["key"]) == list(batch["key"]) and list(out["shard"]) == ["s"] * 5
    assert out["embedding"].shape == (5, 192) and out["logits"].shape == (5, 1000)
    assert out["error"][1] == "decode: broken 1" and out["error"][0] is None
    assert not out["embedding"][[1, 3]].any() and not out["logits"][[1, 3]].any()

    model = SPEC.load().model.eval()
    with torch.inference_mode():
        cls, logits = model.forward_patches(torch.from_numpy(batch["patches"][[0, 2, 4]]))
    np.testing.assert_allclose(out["embedding"][[0, 2, 4]], cls.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["logits"][[0, 2, 4]], logits.numpy(), atol=1e-5)


@pytest.mark.parametrize("rows, pieces", [(7, 3), (2, 4), (5, 1)])
def test_a_batch_embedded_in_pieces_gives_the_rows_of_one_piece(monkeypatch, rows: int, pieces: int):
    """On a GPU a batch goes through the model in pieces (copy of one overlapping compute of the other);
    the rows are the same whatever the split: uneven pieces, fewer rows than pieces, error rows between."""
    monkeypatch.setattr(embed_module, "MIN_PIECE_ROWS", 1)
    whole = EmbedPatches(SPEC, device="cpu", cpu_threads=1, pieces=1)
    split = EmbedPatches(SPEC, device="cpu", cpu_threads=1, pieces=pieces)
    batch = _batch(rows, bad={1})
    a, b = whole(dict(batch)), split(dict(batch))
    np.testing.assert_allclose(b["embedding"], a["embedding"], atol=1e-5)
    np.testing.assert_allclose(b["logits"], a["logits"], atol=1e-5)
    assert list(b["error"]) == list(a["error"]) and not b["embedding"][1].any()


@pytest.mark.parametrize("rows, calls", [(MIN_PIECE_ROWS - 1, 1), (2 * MIN_PIECE_ROWS + 5, 2)])
def test_pieces_are_never_smaller_than_min_piece_rows(rows: int, calls: int):
    stage = EmbedPatches(SPEC, device="cpu", cpu_threads=1, pieces=4)
    sizes = []
    forward = stage.model.forward_patches

    def counted(x, *args):
        sizes.append(len(x))
        return forward(x, *args)

    stage.model.forward_patches = counted  # type: ignore[method-assign]
    out = stage(_batch(rows, bad=set()))
    assert len(sizes) == calls and sum(sizes) == rows and min(sizes) >= min(rows, MIN_PIECE_ROWS)
    assert out["embedding"].shape == (rows, 192)


def test_read_only_patches_as_ray_data_hands_them_give_the_same_rows_without_a_warning():
    import warnings

    stage = EmbedPatches(SPEC, device="cpu", cpu_threads=1)
    batch = _batch(3, bad=set())
    expected = stage(batch)
    batch["patches"].flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = stage(batch)
    np.testing.assert_array_equal(out["embedding"], expected["embedding"])


def test_all_error_batch_skips_the_model():
    out = EmbedPatches(SPEC, device="cpu", embedding_dtype="float16")(_batch(3, bad={0, 1, 2}))
    assert out["embedding"].dtype == np.float16 and not out["embedding"].any()


def test_model_failure_becomes_error_rows():
    stage = EmbedPatches(SPEC, device="cpu")
    out = stage(_batch(2, bad=set(), patches_shape=(5, 768)))  # wrong number of patches for 32 px
    assert all(e.startswith("embed: ") for e in out["error"])


def test_fake_is_deterministic_and_shaped_like_the_real_stage():
    fake = FakeEmbedPatches(embedding_dim=192, num_classes=1000, embedding_dtype="float16")
    a, b = fake(_batch(4, bad={2})), FakeEmbedPatches(192, 1000, "float16")(_batch(4, bad={2}))
    assert a["embedding"].shape == (4, 192) and a["logits"].shape == (4, 1000)
    np.testing.assert_array_equal(a["embedding"], b["embedding"])
    assert not a["embedding"][2].any() and a["embedding"][0].any()


def test_all_null_error_column_from_ray_means_no_errors():
    # Ray Data hands an all-null `error` column to numpy as float NaNs: those rows are fine, not failed.
    batch = _batch(2, bad=set())
    batch["error"] = np.array([np.nan, np.nan], dtype=np.float32)
    out = FakeEmbedPatches(192, 10)(batch)
    assert list(out["error"]) == [None, None] and out["embedding"].any(axis=1).all()
    out = EmbedPatches(SPEC, device="cpu")(batch)
    assert list(out["error"]) == [None, None] and out["embedding"].any(axis=1).all()


def test_decode_in_the_actor_matches_decode_then_embed():
    # --decode gpu: the actor gets bytes and decodes them on its device (here the CPU).
    from pipeline.decode import DecodePatches
    from pipeline.sample import encode, photo_like

    rng = np.random.default_rng(1)
    data = [encode(photo_like(rng, 80, 60)), b"not an image", None, encode(photo_like(rng, 50, 90), "PNG")]
    batch = {
        "key": np.array(["a", "b", "c", "d"], dtype=object),
        "shard": np.array(["s"] * 4, dtype=object),
        "bytes": np.array(data, dtype=object),
        "error": np.array([None, None, "read: gone", None], dtype=object),
    }
    on_device = EmbedPatches(SPEC, device="cpu", decode={"image_size": 32, "patch_size": 16})(dict(batch))
    assert "bytes" not in on_device and on_device["decode_s"].shape == (4,)
    assert on_device["error"][0] is None and on_device["error"][3] is None
    assert on_device["error"][1].startswith("decode: ") and on_device["error"][2] == "read: gone"
    reference = EmbedPatches(SPEC, device="cpu")(DecodePatches(image_size=32, patch_size=16)(dict(batch)))
    # PNG takes the same CPU path: identical; the JPEG differs only by decoder rounding.
    np.testing.assert_allclose(on_device["embedding"][3], reference["embedding"][3], atol=1e-5)
    a, b = on_device["embedding"][0], reference["embedding"][0]
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99
    assert not on_device["embedding"][[1, 2]].any()


def test_null_passthrough_columns_leave_as_objects():
    """A column that was all null in a block comes back from Ray Data as float NaNs; the model stage
    hands it on as object Nones, so that it merges with blocks where it holds bytes or strings."""
    n = 3
    batch = {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "patches": np.zeros((n, 4, 768), np.uint8),
        "error": np.full(n, np.nan),
        "extra": np.full(n, np.nan),
        "bytes_sha256": np.array(["ab", None, "cd"], dtype=object),
    }
    out = FakeEmbedPatches(embedding_dim=8, num_classes=3)(batch)
    assert out["extra"].dtype == object and list(out["extra"]) == [None] * n
    assert list(out["bytes_sha256"]) == ["ab", None, "cd"] and list(out["error"]) == [None] * n
    assert out["top_classes"].shape == (n, 3) and out["top_classes"].dtype == np.int32
