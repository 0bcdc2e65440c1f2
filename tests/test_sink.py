"""Sink: fixed-size-list columns, nulls on error rows, footer metadata, staged parts, one file per unit."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.sink import OutputSpec, ParquetSink, footer_metadata, to_table, write_parts


def _batch(n: int, dim: int, classes: int, bad: set[int], shard: str = "s0") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {
        "key": np.array([f"{shard}/k{i}" for i in range(n)], dtype=object),
        "shard": np.array([shard] * n, dtype=object),
        "embedding": rng.standard_normal((n, dim)).astype(np.float32),
        "logits": rng.standard_normal((n, classes)).astype(np.float32),
        "error": np.array([f"decode: bad {i}" if i in bad else None for i in range(n)], dtype=object),
    }


def test_to_table_types_and_nulls():
    spec = OutputSpec(embedding_dim=8, num_classes=5, embedding_dtype="float16")
    batch = _batch(4, 8, 5, bad={2})
    t = to_table(batch, spec)
    assert t.schema.field("embedding").type == pa.list_(pa.float16(), 8)
    assert t.schema.field("logits").type == pa.list_(pa.float32(), 5)
    assert t["error"].to_pylist() == [None, None, "decode: bad 2", None]
    assert t["embedding"].to_pylist()[2] is None and t["logits"].to_pylist()[2] is None
    np.testing.assert_allclose(
        np.array(t["embedding"].to_pylist()[0], dtype=np.float32), batch["embedding"][0], rtol=1e-3
    )
    np.testing.assert_array_equal(np.array(t["logits"].to_pylist()[3]), batch["logits"][3])


def test_headless_model_has_no_logits_column():
    t = to_table(_batch(2, 4, 3, set()), OutputSpec(4, 0, topk=5))
    assert t.column_names == ["key", "embedding", "width", "height", "bytes_sha256", "run_id", "error"]


def test_top_k_provenance_and_passed_through_columns():
    from pipeline.embed import top_k
    from pipeline.rows import pack_extra

    names = ("cat", "dog", "fox", "owl", "emu")
    spec = OutputSpec(8, 5, topk=3, logits=False, class_names=names, extra=(("id", pa.int64()),))
    batch = _batch(3, 8, 5, bad={1})
    batch["top_classes"], batch["top_scores"] = top_k(batch["logits"], 3)
    batch["width"] = np.array([640, -1, 300], np.int32)
    batch["height"] = np.array([480, -1, 200], np.int32)
    batch["bytes_sha256"] = np.array(["ab" * 32, None, "cd" * 32], dtype=object)
    big = 2**62 + 1  # an int64 that a float would change: passed-through values cross Ray Data as bytes
    batch["extra"] = np.array([pack_extra([big]), None, pack_extra([None])], dtype=object)
    t = to_table(batch, spec, run_id="r7")
    assert "logits" not in t.column_names
    assert t.schema.field("top_classes").type == pa.list_(pa.int32())
    assert t.schema.field("top_scores").type == pa.list_(pa.float32())
    assert t.schema.field("top_names").type == pa.list_(pa.string())
    best = np.argsort(-batch["logits"], axis=1)[:, :3]
    assert t["top_classes"].to_pylist() == [best[0].tolist(), None, best[2].tolist()]
    assert t["top_names"].to_pylist()[2] == [names[c] for c in best[2]]
    probs = np.exp(batch["logits"][0]) / np.exp(batch["logits"][0]).sum()
    np.testing.assert_allclose(t["top_scores"].to_pylist()[0], probs[best[0]], rtol=1e-5)
    assert t["width"].to_pylist() == [640, None, 300] and t["height"].to_pylist() == [480, None, 200]
    assert t["bytes_sha256"].to_pylist() == ["ab" * 32, None, "cd" * 32]
    assert t["run_id"].to_pylist() == ["r7"] * 3
    assert t["id"].to_pylist() == [big, None, None]


def _unit_batch(n: int, dim: int, classes: int, bad: set[int], unit: int, shard: str, total: int = -1):
    b = _batch(n, dim, classes, bad, shard)
    b["unit"] = np.full(n, unit, np.int64)
    b["unit_rows"] = np.full(n, total, np.int64)
    return b


def _concat(*batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_parts_per_unit_then_one_file_per_unit(tmp_path):
    out = tmp_path / "out"
    spec = OutputSpec(16, 10, "float16", "float16")
    sink = ParquetSink(str(out), spec, "run1", {"model": "vit_ti_16", "weights_sha256": "abc"})
    # Two write calls; unit 0 spans both (its last row, with the total, in the second), unit 1 is whole.
    first = sink.write_parts(
        _concat(_unit_batch(5, 16, 10, {1}, 0, "a.tar"), _unit_batch(3, 16, 10, set(), 1, "b.tar", total=3))
    )
    second = sink.write_parts(_unit_batch(2, 16, 10, {0}, 0, "a.tar", total=7))
    assert [(p.unit, p.rows, p.errors, p.unit_rows) for p in first] == [(0, 5, 1, -1), (1, 3, 0, 3)]
    assert [(p.unit, p.rows, p.errors, p.unit_rows, p.shards) for p in second] == [
        (0, 2, 1, 7, {"a.tar": (2, 1)})
    ]
    # Staged parts are invisible.
    assert pads.dataset(str(out), format="parquet").count_rows() == 0
    names = [sink.place_unit([first[0], second[0]]), sink.place_unit([first[1]])]
    assert names == ["part-run1-u000000.parquet", "part-run1-u000001.parquet"]
    sink.remove_staging()
    assert sorted(f.name for f in out.iterdir()) == names
    table = pads.dataset(str(out), format="parquet").to_table()
    assert table.num_rows == 10 and table["error"].null_count == 8
    f = pq.ParquetFile(out / names[0])
    assert f.metadata.num_rows == 7
    assert footer_metadata(f) == {"model": "vit_ti_16", "weights_sha256": "abc", "schema_version": "2"}
    assert set(table["run_id"].to_pylist()) == {"run1"}
    col = f.metadata.row_group(0).column(1)
    assert col.path_in_schema == "embedding.list.element" and col.compression == "ZSTD"
    # float16: no byte-stream-split, which DuckDB cannot read on half floats
    assert "BYTE_STREAM_SPLIT" not in col.encodings


def test_staging_a_unit_again_gives_the_same_file(tmp_path):
    """A retried merge task writes the same staged file; moving it over the placed file changes nothing."""
    sink = ParquetSink(str(tmp_path), OutputSpec(4, 2), "r", {})
    a = sink.write_parts(_unit_batch(2, 4, 2, set(), 3, "s"))
    b = sink.write_parts(_unit_batch(1, 4, 2, set(), 3, "s", total=3))
    staged = sink.stage_unit(a + b)
    assert staged == f"_staging/r/{sink.final_name(3)}" and sink.stage_unit(a + b) == staged
    sink.move_into_place(staged, sink.final_name(3))
    before = pq.read_table(tmp_path / sink.final_name(3))
    sink.move_into_place(sink.stage_unit(a + b), sink.final_name(3))
    assert pq.read_table(tmp_path / sink.final_name(3)).equals(before)


def test_a_replacement_swaps_the_retried_rows_in_one_file(tmp_path):
    spec = OutputSpec(4, 2)
    first = ParquetSink(str(tmp_path), spec, "r1", {"run_id": "r1"})
    name = first.place_unit(first.write_parts(_unit_batch(4, 4, 2, {1, 3}, 0, "s.tar", total=4)))
    retry = ParquetSink(str(tmp_path), spec, "r2", {"run_id": "r2"})
    # The retried keys come back: s.tar/k1 now decodes; s.tar/k3 fails again.
    batch = _unit_batch(4, 4, 2, {3}, 0, "s.tar", total=2)
    fixed = {k: v[[1, 3]] for k, v in batch.items()}
    parts = retry.write_parts(fixed)
    staged, counts = retry.stage_replacement(parts, name, ("s.tar/k1", "s.tar/k3"), "s.tar")
    assert counts == {"s.tar": (4, 1)}
    assert pq.read_table(tmp_path / name)["error"].null_count == 2  # unchanged until the move
    retry.move_into_place(staged, name)
    table = pq.read_table(tmp_path / name)
    assert sorted(table["key"].to_pylist()) == [f"s.tar/k{i}" for i in range(4)]
    assert table["error"].null_count == 3
    assert footer_metadata(pq.ParquetFile(tmp_path / name))["run_id"] == "r1"


def test_the_write_stage_reports_one_part_per_unit(tmp_path):
    sink = ParquetSink(str(tmp_path), OutputSpec(4, 2), "r", {})
    [part] = sink.write_parts(_unit_batch(3, 4, 2, {2}, 5, "x", total=3))
    [again] = write_parts(_unit_batch(3, 4, 2, {2}, 5, "x", total=3), sink)["part"]
    assert (again.unit, again.rows, again.errors, again.unit_rows, again.shards) == (
        5,
        3,
        1,
        3,
        {"x": (3, 1)},
    )
    assert part.staged != again.staged  # every write attempt gets its own staged name


def test_other_readers_see_fixed_size_vectors(tmp_path):
    duckdb = pytest.importorskip("duckdb", reason="duckdb is in the test extra")
    polars = pytest.importorskip("polars", reason="polars is in the test extra")
    sink = ParquetSink(str(tmp_path), OutputSpec(8, 3), "r", {})
    sink.place_unit(sink.write_parts(_unit_batch(6, 8, 3, {4}, 0, "s", total=6)))
    glob = f"{tmp_path}/*.parquet"
    col = pq.ParquetFile(next(tmp_path.glob("*.parquet"))).metadata.row_group(0).column(1)
    assert "BYTE_STREAM_SPLIT" in col.encodings  # float32 vectors get it
    rows = duckdb.sql(
        f"SELECT key, array_cosine_similarity(embedding::FLOAT[8], embedding::FLOAT[8]) AS s "
        f"FROM '{glob}' WHERE error IS NULL ORDER BY key"
    ).fetchall()
    assert len(rows) == 5 and all(abs(s - 1.0) < 1e-5 for _, s in rows)
    df = polars.read_parquet(glob)
    assert df.schema["embedding"] == polars.Array(polars.Float32, 8)
    assert df.filter(polars.col("error").is_not_null()).height == 1


def test_remove_staging_leaves_nothing_visible(tmp_path):
    sink = ParquetSink(str(tmp_path), OutputSpec(4, 2), "r", {})
    sink.write_parts(_unit_batch(3, 4, 2, set(), 0, "s"))
    sink.remove_staging()
    assert not any(tmp_path.rglob("*.parquet")) and not (tmp_path / "_staging").exists()
