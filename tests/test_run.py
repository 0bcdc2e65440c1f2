"""The job end to end on a real local Ray, from and to a real S3 endpoint (moto) and local directories."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import JobConfig
from pipeline.embed import FakeEmbedPatches
from pipeline.ledger import OutputConflictError
from pipeline.plan import plan
from pipeline.run import run
from pipeline.sample import encode, make_sample, photo_like
from pipeline.sink import footer_metadata
from pipeline.sources import InputError

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = {"model": "vit_ti_16", "weights": "random", "image_size": 32, "batch_size": 16}


def _images(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [encode(photo_like(rng, 64 + 8 * i, 48 + 4 * i)) for i in range(n)]


def _tar(samples: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in samples.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _parquet(images: list[bytes | None]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "id": list(range(len(images)))}), buf)
    return buf.getvalue()


def _read_output(uri: str) -> pa.Table:
    from pipeline.sources import resolve_uri

    fs, root = resolve_uri(uri)
    return pads.dataset(root, filesystem=fs, format="parquet").to_table()


def _check_output(table: pa.Table, expected_keys: set[str], dim: int = 192, classes: int = 1000) -> None:
    keys = table["key"].to_pylist()
    assert len(keys) == len(set(keys)), "a key was written twice"
    assert set(keys) == expected_keys
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), dim)
    assert table.schema.field("logits").type == pa.list_(pa.float32(), classes)
    ok = table.filter(pa.compute.is_null(table["error"]))
    emb = np.array(ok["embedding"].to_pylist(), dtype=np.float32)
    assert np.isfinite(emb).all() and (np.abs(emb).sum(axis=1) > 0).all()
    # The top-5 classes are the logits' five largest, scored by softmax.
    logits = np.array(ok["logits"].to_pylist(), dtype=np.float32)
    top = np.array(ok["top_classes"].to_pylist())
    np.testing.assert_array_equal(top, np.argsort(-logits, axis=1, kind="stable")[:, :5])
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    expected_scores = np.take_along_axis(probs, top, axis=1)
    np.testing.assert_allclose(np.array(ok["top_scores"].to_pylist()), expected_scores, rtol=1e-4)
    assert len(set(table["run_id"].to_pylist())) >= 1 and None not in table["run_id"].to_pylist()


def test_local_files_to_local_output(tmp_path: Path, ray_local: None):
    src = tmp_path / "in"
    paths = make_sample(src, n=10)
    (src / "broken.jpg").write_bytes(b"<html>not an image</html>")
    out = tmp_path / "out"
    summary = run(JobConfig(input=str(src), output=str(out), max_error_rate=0.5, **SMALL))
    expected = {p.relative_to(src).as_posix() for p in paths} | {"broken.jpg"}
    table = _read_output(str(out))
    _check_output(table, expected)
    errors = dict(zip(table["key"].to_pylist(), table["error"].to_pylist()))
    assert errors["broken.jpg"].startswith("decode: ")
    assert summary.processed == 11 and summary.errors == 1 and summary.skipped == 0
    start = summary.startup  # where the start went
    assert set(start) == {"plan", "ray", "model_start", "first_part", "first_row"}
    assert start["plan"] + start["ray"] <= start["first_part"] <= start["first_row"] <= summary.seconds
    # The model actor's own start (torch, the weights) is measured in the actor, before its first batch.
    assert 0 < start["model_start"] < start["first_part"]
    assert "model actor start" in summary.describe()
    assert f"committed {start['first_row']:.1f} s into the run" in summary.describe()
    meta = footer_metadata(pq.ParquetFile(next(out.glob("*.parquet"))))
    assert meta["model"] == "vit_ti_16" and meta["weights_sha256"] == "random"
    assert meta["image_size"] == "32" and "centre crop 32" in meta["preprocessing"]
    assert meta["version"] and meta["run_id"] == summary.run_id
    assert (out / "_runs" / summary.run_id / "summary.json").exists()

    # Same command again: nothing new to do, nothing written twice.
    again = run(JobConfig(input=str(src), output=str(out), max_error_rate=0.5, **SMALL))
    assert again.processed == 0 and again.skipped == 11
    assert _read_output(str(out)).num_rows == 11

    # New files land (a scheduled run): only they are processed.
    (src / "new").mkdir()
    (src / "new" / "late.jpg").write_bytes(_images(1, seed=9)[0])
    third = run(JobConfig(input=str(src), output=str(out), max_error_rate=0.5, **SMALL))
    assert third.processed == 1 and third.skipped == 11
    _check_output(_read_output(str(out)), expected | {"new/late.jpg"})

    # Another model into the same output is refused.
    with pytest.raises(OutputConflictError, match="different model"):
        plan(JobConfig(input=str(src), output=str(out), **{**SMALL, "model": "vit_s_16"}))


@pytest.mark.parametrize("output_kind", ["s3", "local"])
def test_all_input_kinds_from_s3(
    tmp_path: Path, s3_server: str, s3_bucket: str, ray_local: None, output_kind
):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    imgs = _images(6)
    for i, data in enumerate(imgs[:3]):
        s3.put_object(Bucket=s3_bucket, Key=f"files/dir {i % 2}/im{i}.JPG", Body=data)
    s3.put_object(
        Bucket=s3_bucket,
        Key="tars/shard-0.tar",
        Body=_tar({"a/s1.json": b"{}", "a/s1.jpg": imgs[3], "a/s2.png": imgs[4]}),
    )
    s3.put_object(Bucket=s3_bucket, Key="pq/part.parquet", Body=_parquet([imgs[5], None]))

    expected = {
        "files": {"dir 0/im0.JPG", "dir 1/im1.JPG", "dir 0/im2.JPG"},
        "tars": {"shard-0.tar#a/s1", "shard-0.tar#a/s2"},
        "pq": {"part.parquet#0", "part.parquet#1"},
    }
    source = {f"dir {i % 2}/im{i}.JPG": imgs[i] for i in range(3)}
    source |= {"shard-0.tar#a/s1": imgs[3], "shard-0.tar#a/s2": imgs[4], "part.parquet#0": imgs[5]}
    for prefix, keys in expected.items():
        out = f"s3://{s3_bucket}/out-{prefix}" if output_kind == "s3" else str(tmp_path / f"out-{prefix}")
        keep = ("id",) if prefix == "pq" else ()
        summary = run(
            JobConfig(
                input=f"s3://{s3_bucket}/{prefix}", output=out, max_error_rate=0.6, keep_columns=keep, **SMALL
            )
        )
        table = _read_output(out)
        _check_output(table, keys)
        assert summary.processed == len(keys)
        rows = {r["key"]: r for r in table.to_pylist()}
        for key, data in source.items():  # provenance: the source's size and bytes, the run
            if key in rows:
                size = Image.open(io.BytesIO(data)).size
                assert (rows[key]["width"], rows[key]["height"]) == size
                assert rows[key]["bytes_sha256"] == hashlib.sha256(data).hexdigest()
                assert rows[key]["run_id"] == summary.run_id
        if prefix == "tars":  # the sidecars, null where a sample has none
            assert (rows["shard-0.tar#a/s1"]["json"], rows["shard-0.tar#a/s2"]["json"]) == ("{}", None)
            assert table.schema.field("cls").type == pa.int64()
        if prefix == "pq":
            err = dict(zip(table["key"].to_pylist(), table["error"].to_pylist()))["part.parquet#1"]
            assert err and err.startswith("read: ")
            assert [rows[f"part.parquet#{i}"]["id"] for i in (0, 1)] == [0, 1]


def test_fake_embedder_and_float16(tmp_path: Path, ray_local: None):
    src = tmp_path / "in"
    make_sample(src, n=20)
    out = tmp_path / "out"
    cfg = JobConfig(
        input=str(src), output=str(out), embedding_dtype="float16", logits_dtype="float16", **SMALL
    )
    # The fake must match the real model's output shape for the schema: vit_ti_16 → 192 dims, 1000 classes.
    summary = run(
        cfg,
        embedder=FakeEmbedPatches,
        embedder_kwargs={
            "embedding_dim": 192,
            "num_classes": 1000,
            "embedding_dtype": "float16",
            "logits_dtype": "float16",
        },
    )
    table = _read_output(str(out))
    assert table.num_rows == 20 == summary.processed
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 192)
    # The per-stage report covers every stage and names the one that bounds the run.
    assert set(summary.stage_seconds) == {"read", "decode", "embed", "write"}
    assert all(v >= 0 for v in summary.stage_seconds.values()) and summary.stage_seconds["decode"] > 0
    assert summary.bound in summary.stage_seconds
    prefix = {"read": "Read", "decode": "Decode", "embed": "Model", "write": "Write"}[summary.bound]
    assert summary.hint.startswith(prefix + "-bound") and summary.hint in summary.describe()


def test_clear_errors_before_anything_runs(tmp_path: Path, s3_server: str, s3_bucket: str):
    with pytest.raises(InputError, match=r"does not exist|not found|No such"):
        plan(JobConfig(input=str(tmp_path / "missing"), output=str(tmp_path / "o"), **SMALL))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty|no "):
        plan(JobConfig(input=str(tmp_path / "empty"), output=str(tmp_path / "o"), **SMALL))
    with pytest.raises(InputError):
        plan(JobConfig(input=f"s3://{s3_bucket}/nothing-here", output=str(tmp_path / "o"), **SMALL))


def test_run_record_has_counts(tmp_path: Path, ray_local: None):
    """Also --preprocess exact end to end: recorded, and never mixed with the fast mode in one output."""
    src = tmp_path / "in"
    make_sample(src, n=4)
    out = tmp_path / "out"
    summary = run(JobConfig(input=str(src), output=str(out), preprocess="exact", **SMALL))
    run_dir = out / "_runs" / summary.run_id
    identity = json.loads((run_dir / "run.json").read_text())["identity"]
    assert identity["model"] == "vit_ti_16" and identity["preprocess"] == "exact"
    assert (
        "torchvision's PIL path"
        in footer_metadata(pq.ParquetFile(next(out.glob("*.parquet"))))["preprocessing"]
    )
    with pytest.raises(OutputConflictError, match="preprocessing"):
        plan(JobConfig(input=str(src), output=str(out), **SMALL))
    assert json.loads((run_dir / "summary.json").read_text())["summary"]["processed"] == 4
    commits = [json.loads(p.read_text()) for p in sorted(run_dir.glob("commit-*.json"))]
    units = [u for c in commits for u in c["units"]]
    assert sorted(rel for u in units for rel, _, _ in u["shards"]) == sorted(
        p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()
    )
    assert sorted(u["file"] for u in units) == sorted(p.name for p in out.glob("*.parquet"))
    assert all(u["staged"].startswith(f"_staging/{summary.run_id}/") for u in units)


def test_decode_in_the_model_actor(tmp_path: Path, ray_local: None):
    """--decode gpu on a cluster without GPUs: the actor decodes on its CPU; same rows, same errors."""
    src = tmp_path / "in"
    make_sample(src, n=6)
    (src / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    summary = run(JobConfig(input=str(src), output=str(out), decode="gpu", max_error_rate=0.5, **SMALL))
    table = _read_output(str(out))
    _check_output(table, {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()})
    errors = dict(zip(table["key"].to_pylist(), table["error"].to_pylist()))
    assert errors["junk.jpg"].startswith("decode: ") and summary.errors == 1
    assert summary.stage_seconds["decode"] > 0
    meta = footer_metadata(pq.ParquetFile(next(out.glob("*.parquet"))))
    assert meta["decode"].startswith("JPEG on the model's device")


def test_units_are_staged_then_moved_into_place(tmp_path: Path, ray_local: None):
    """One part: the part is the staged file, moved by the driver's threads; several: merged by a Ray
    task first. Same result either way, and the merged parts are deleted."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.ledger import Ledger
    from pipeline.run import _mover, _stager
    from pipeline.sink import OutputSpec, ParquetSink
    from pipeline.sources import Shard
    from pipeline.units import Progress, Unit

    def rows(n: int, unit: int, total: int = -1) -> dict[str, np.ndarray]:
        return {
            "key": np.array([f"u{unit}/{i}" for i in range(n)], dtype=object),
            "shard": np.array([f"u{unit}"] * n, dtype=object),
            "embedding": np.ones((n, 4), np.float32),
            "logits": np.ones((n, 2), np.float32),
            "error": np.array([None] * n, dtype=object),
            "unit": np.full(n, unit, np.int64),
            "unit_rows": np.full(n, total, np.int64),
        }

    sink = ParquetSink(str(tmp_path), OutputSpec(4, 2), "r1", {})
    merged = sink.write_parts(rows(3, 0)) + sink.write_parts(rows(2, 0, total=5))
    moved = sink.write_parts(rows(4, 1, total=4))
    units = [Unit(u, (Shard(f"u{u}", f"u{u}", "file", 0),)) for u in (0, 1)]
    progress = [Progress(units[0], merged, 5, 5), Progress(units[1], moved, 4, 4)]
    records = _stager(sink, Ledger(str(tmp_path)))(progress)
    assert [r.file for r in records] == [sink.final_name(0), sink.final_name(1)]
    assert [r.shards for r in records] == [{"u0": (5, 0)}, {"u1": (4, 0)}]
    assert not list(tmp_path.glob("*.parquet")), "staging makes nothing visible"
    with ThreadPoolExecutor(2) as pool:
        _mover(sink, pool)(records, [merged, moved])
    assert [pq.read_metadata(tmp_path / r.file).num_rows for r in records] == [5, 4]
    assert not list((tmp_path / "_staging").rglob("*.parquet"))
