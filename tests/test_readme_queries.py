"""The README's querying commands and DuckDB queries run as written on the demo's output, and its output
table is the writer's schema."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.sink import OutputSpec

if TYPE_CHECKING:
    from tests.ray_head import RayHead

README = Path(__file__).resolve().parent.parent / "README.md"


def _querying_section() -> str:
    text = README.read_text()
    start = text.index("### Querying\n")
    end = re.compile(r"^##", re.M).search(text, start + 1)
    return text[start : end.start() if end else len(text)]


def _sql_statements() -> list[str]:
    block = re.search(r"```sql\n(.*?)```", _querying_section(), re.S)
    assert block, "the README's Querying section has no ```sql block"
    lines = [line for line in block.group(1).splitlines() if not line.startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _query_commands() -> list[list[str]]:
    """The `python jobs/query.py …` lines of the Querying section, as argument lists."""
    block = re.search(r"```bash\n(.*?)```", _querying_section(), re.S)
    assert block, "the README's Querying section has no ```bash block"
    return [shlex.split(line, comments=True)[2:] for line in block.group(1).splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.integration
def test_readme_queries_run_as_written_on_the_demo_output(
    tmp_path_factory: pytest.TempPathFactory,
    ray_cluster: RayHead,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    """In a directory laid out as `jobs/embed.py --demo` leaves it (`data/sample`, `out/demo`, written by
    the job), with one image stored twice and one broken file."""
    import duckdb

    from jobs.query import main
    from tests.test_query import BROKEN, DUP, demo_output

    base = demo_output(tmp_path_factory, ray_cluster)
    monkeypatch.chdir(base)
    table = pa.concat_tables([pq.read_table(p) for p in sorted(base.glob("out/demo/part-*.parquet"))])
    good = table.filter(pc.is_null(table["error"]))
    x = np.stack([np.asarray(v, np.float32) for v in good["embedding"].to_pylist()])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    keys = good["key"].to_pylist()

    nearest, top1, errors = (duckdb.sql(sql).fetchall() for sql in _sql_statements())
    cosines = dict(zip(keys, (x @ x[keys.index("img_0000.jpg")]).tolist()))
    assert {k for k, _ in nearest[:2]} == set(DUP) and all(c > 0.9999 for _, c in nearest[:2])
    assert len(nearest) == 5 and BROKEN not in [k for k, _ in nearest]
    assert all(abs(cosines[k] - c) < 1e-5 for k, c in nearest)
    assert [c for _, c in nearest] == sorted((c for _, c in nearest), reverse=True)
    assert min(c for _, c in nearest) >= sorted(cosines.values())[-5] - 1e-5
    by_key = {r["key"]: r for r in good.to_pylist()}
    assert [k for k, _, _ in top1] == sorted(by_key)[:5]
    for key, class_, score in top1:
        assert class_ == by_key[key]["top_classes"][0]
        assert score == pytest.approx(by_key[key]["top_scores"][0], abs=1e-4)
    failed = table.filter(pc.is_valid(table["error"]))["error"].to_pylist()
    assert errors == [(failed[0], 1)] and len(failed) == 1

    commands = _query_commands()
    assert {argv[0] for argv in commands} == {"stats", "similar", "top", "dups", "errors"}
    capsys.readouterr()
    for argv in commands:
        assert main(argv) == 0, (argv, capsys.readouterr().err)
        assert capsys.readouterr().out.strip(), argv


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
