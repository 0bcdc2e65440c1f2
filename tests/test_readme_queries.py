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


def _readme_columns() -> list[tuple[str, str]]:
    """(column, type) of each row of the README's output table, in order."""
    text = README.read_text()
    table = text[text.index("| column | type | |") :].split("\n\n", 1)[0].splitlines()[2:]
    columns = []
    for line in table:
        names, type_ = (cell.strip() for cell in line.strip("|").split("|")[:2])
        columns += [(name, type_) for name in re.findall(r"`([^`]+)`", names)]
    return columns


def test_readme_output_table_is_the_writers_schema():
    """The README's column table names every column the writer makes, in its order and with its types;
    changing the schema means changing both (and pipeline.sink.SCHEMA_VERSION)."""
    import pyarrow as pa

    from pipeline.sink import SCHEMA_VERSION
    from pipeline.sources.webdataset import SIDECARS

    readme = _readme_columns()
    assert readme[-1] == ("--keep-columns", "as in the input")
    spec = OutputSpec(768, 1000, topk=5, class_names=("a",) * 1000, extra=SIDECARS)
    schema = spec.schema()
    assert [name for name, _ in readme[:-1]] == schema.names
    written = {
        "string": pa.string(),
        "int32": pa.int32(),
        "int64": pa.int64(),
        "list<int32>": pa.list_(pa.int32()),
        "list<float32>": pa.list_(pa.float32()),
        "list<string>": pa.list_(pa.string()),
    }
    for name, type_ in readme[:-1]:
        field = schema.field(name)
        if type_.startswith("fixed_size_list<float32 or float16>"):
            assert pa.types.is_fixed_size_list(field.type), name
            for dtype in ("float32", "float16"):
                other = OutputSpec(768, 1000, dtype, dtype).schema().field(name).type
                assert str(other.value_type) == {"float32": "float", "float16": "halffloat"}[dtype]
        else:
            assert field.type == written[type_], (name, field.type, type_)
    documented = re.search(r"`schema_version`\s+\(`(\d+)`", README.read_text())
    assert documented and documented.group(1) == SCHEMA_VERSION
