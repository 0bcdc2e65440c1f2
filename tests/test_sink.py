"""Sink: fixed-size-list columns, nulls on error rows, footer metadata, staging + commit."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.sink import OutputSpec, ParquetSink, footer_metadata, to_table


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
    t = to_table(_batch(2, 4, 3, set()), OutputSpec(4, 0))
    assert t.column_names == ["key", "embedding", "error"]


def test_write_commit_and_read_back(tmp_path):
    out = tmp_path / "out"
    spec = OutputSpec(16, 10, "float16", "float16")
    sink = ParquetSink(str(out), spec, "run1", {"model": "vit_ti_16", "weights_sha256": "abc"})
    staged = sink.write_blocks([_batch(5, 16, 10, {1}, "a.tar"), _batch(3, 16, 10, set(), "b.tar")], 0)
    staged += sink.write_blocks([_batch(2, 16, 10, {0}, "c.tar")], 1)
    staged += sink.write_blocks([], 2)  # an empty write task leaves no file
    assert len(staged) == 2
    # Before commit nothing is visible in the dataset.
    assert pads.dataset(str(out), format="parquet").count_rows() == 0
    sink.commit(staged)
    ds = pads.dataset(str(out), format="parquet")
    table = ds.to_table()
    assert table.num_rows == 10
    assert sorted(f.name for f in out.iterdir()) == ["part-run1-00000.parquet", "part-run1-00001.parquet"]
    assert staged[0].shards == {"a.tar": (5, 1), "b.tar": (3, 0)}
    assert staged[1].errors == 1
    f = pq.ParquetFile(out / "part-run1-00000.parquet")
    assert footer_metadata(f) == {"model": "vit_ti_16", "weights_sha256": "abc"}
    col = f.metadata.row_group(0).column(1)
    assert col.path_in_schema == "embedding.list.element"
    assert "BYTE_STREAM_SPLIT" in col.encodings and col.compression == "ZSTD"


def test_other_readers_see_fixed_size_vectors(tmp_path):
    duckdb = pytest.importorskip("duckdb", reason="duckdb is in the test extra")
    polars = pytest.importorskip("polars", reason="polars is in the test extra")
    sink = ParquetSink(str(tmp_path), OutputSpec(8, 3), "r", {})
    sink.commit(sink.write_blocks([_batch(6, 8, 3, {4})], 0))
    glob = f"{tmp_path}/*.parquet"
    rows = duckdb.sql(
        f"SELECT key, array_cosine_similarity(embedding::FLOAT[8], embedding::FLOAT[8]) AS s "
        f"FROM '{glob}' WHERE error IS NULL ORDER BY key"
    ).fetchall()
    assert len(rows) == 5 and all(abs(s - 1.0) < 1e-5 for _, s in rows)
    df = polars.read_parquet(glob)
    assert df.schema["embedding"] == polars.Array(polars.Float32, 8)
    assert df.filter(polars.col("error").is_not_null()).height == 1


def test_abort_leaves_nothing_visible(tmp_path):
    sink = ParquetSink(str(tmp_path), OutputSpec(4, 2), "r", {})
    sink.write_blocks([_batch(3, 4, 2, set())], 0)
    sink.abort()
    assert not any(tmp_path.rglob("*.parquet"))
