"""The README's DuckDB recipes run as written against output the sink writes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.sink import OutputSpec, ParquetSink

README = Path(__file__).resolve().parent.parent / "README.md"


def _sql_statements() -> list[str]:
    block = re.search(r"```sql\n(.*?)```", README.read_text(), re.S)
    assert block, "README has no ```sql block"
    lines = [line for line in block.group(1).splitlines() if not line.startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def test_readme_queries(tmp_path: Path):
    duckdb = pytest.importorskip("duckdb", reason="duckdb is a dependency of the package")
    rng = np.random.default_rng(0)
    keys = ["cats/001.jpg", "cats/002.jpg", "dogs/001.jpg", "broken.jpg"]
    batch = {
        "key": np.array(keys, dtype=object),
        "shard": np.array(keys, dtype=object),
        "embedding": rng.standard_normal((4, 768)).astype(np.float32),
        "logits": rng.standard_normal((4, 1000)).astype(np.float32),
        "error": np.array([None, None, None, "decode: DecodeError: cannot decode image"], dtype=object),
        "unit": np.zeros(4, np.int64),
        "unit_rows": np.full(4, 4, np.int64),
    }
    sink = ParquetSink(str(tmp_path), OutputSpec(768, 1000, "float16", "float16"), "r", {})
    sink.place_unit(sink.write_parts(batch))
    results = []
    for sql in _sql_statements():
        results.append(duckdb.sql(sql.replace("'out/*.parquet'", f"'{tmp_path}/*.parquet'")).fetchall())
    nearest, top1, errors = results
    assert nearest[0][0] == "cats/001.jpg" and abs(nearest[0][1] - 1.0) < 1e-3
    assert len(nearest) == 3 and "broken.jpg" not in [k for k, _ in nearest]
    expected = {k: int(np.argmax(batch["logits"][i].astype(np.float16))) for i, k in enumerate(keys[:3])}
    assert dict(top1) == expected
    assert errors == [("decode: DecodeError: cannot decode image", 1)]
