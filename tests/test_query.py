"""jobs/query.py and pipeline/query.py on output written by the real job, and docs/querying.md's recipes.

The job runs once per output kind: a local output laid out as `jobs/embed.py --demo` leaves it
(`data/sample` in, `out/demo` out; shared with tests/test_readme_queries.py), and an S3 output on the
tests' S3 endpoint, with class names, float16 embeddings, no logits and --preprocess exact. The input
holds one image under two keys (a byte-identical copy) and one file that is not an image. Every expected
value is computed here from the rows themselves, read with pyarrow.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from jobs import query as query_cli
from pipeline import query
from pipeline.sample import make_sample
from pipeline.sink import SCHEMA_VERSION, footer_metadata
from pipeline.storage import resolve_uri, split_s3_uri
from tests.conftest import TEST_AWS_ENV, create_bucket, small_config

if TYPE_CHECKING:
    from tests.ray_head import RayHead

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "querying.md"
IMAGES = 11  # generated images; plus a byte-identical copy of the first and a broken file
DUP = ("img_0000.jpg", "copies/img_0000 again.jpg")
BROKEN = "broken.jpg"
CLASSES = 1000  # vit_ti_16's head
integration = [pytest.mark.slow, pytest.mark.integration]

_BUILT: dict[str, Any] = {}


def _connect(head: RayHead) -> None:
    """This process on the session's Ray, as the ray_local fixture connects it."""
    import ray

    if not ray.is_initialized():
        ray.init(address=head.gcs_address, log_to_driver=False)


def _sample(src: Path) -> None:
    make_sample(src, IMAGES)
    (src / "copies").mkdir()
    shutil.copyfile(src / DUP[0], src / DUP[1])
    (src / BROKEN).write_bytes(b"not an image, whatever the extension says")


def demo_output(tmp_path_factory: pytest.TempPathFactory, head: RayHead) -> Path:
    """A directory laid out as `jobs/embed.py --demo` leaves it: `data/sample` (the input) and `out/demo`
    (vit_ti_16 with random weights, written by the job in-process on the session's Ray, at 32 px). Made
    once per session; tests must not change it (copy it first)."""
    if "demo" not in _BUILT:
        from pipeline.run import run

        base = tmp_path_factory.mktemp("demo")
        _sample(base / "data" / "sample")
        _connect(head)
        summary = run(small_config(base / "data" / "sample", base / "out" / "demo", max_error_rate=0.5))
        assert summary.processed == IMAGES + 2 and summary.errors == 1
        _BUILT["demo"] = base
    return _BUILT["demo"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, ray_cluster: RayHead) -> Path:
    return demo_output(tmp_path_factory, ray_cluster)


@pytest.fixture(scope="module")
def out(demo: Path) -> str:
    return str(demo / "out" / "demo")


@pytest.fixture(scope="module")
def s3_output(
    tmp_path_factory: pytest.TempPathFactory, ray_cluster: RayHead, s3_server: str, demo: Path
) -> tuple[str, Path]:
    """The same input embedded into s3://<bucket>/query out#1 (a literal key prefix) with class names,
    float16 embeddings, top-3, no logits and --preprocess exact; yields the URI and a local copy of its
    data files (the docs' `out/photos`)."""
    import boto3

    from pipeline.run import run

    bucket = f"t-{uuid.uuid4().hex[:12]}"  # conftest removes such buckets on a real endpoint
    create_bucket(boto3.client("s3", endpoint_url=s3_server), bucket)
    names = tmp_path_factory.mktemp("names") / "names.txt"
    names.write_text("\n".join(f"class {i:03d}" for i in range(CLASSES)) + "\n")
    uri = f"s3://{bucket}/query out#1"
    _connect(ray_cluster)
    config = small_config(
        demo / "data" / "sample",
        uri,
        max_error_rate=0.5,
        embedding_dtype="float16",
        logits="none",
        topk=3,
        class_names=str(names),
        preprocess="exact",
    )
    summary = run(config)
    assert summary.processed == IMAGES + 2
    copy = tmp_path_factory.mktemp("photos") / "out" / "photos"
    copy.mkdir(parents=True)
    fs, root = resolve_uri(uri)
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.base_name.startswith("part-"):
            pafs.copy_files(info.path, str(copy / info.base_name), source_filesystem=fs)
    return uri, copy


# --------------------------------------------------------------------------------------------------------
# Helpers


def rows(output: str | Path) -> pa.Table:
    """Every row of a local output's data files."""
    return pa.concat_tables([pq.read_table(p) for p in sorted(Path(output).glob("part-*.parquet"))])


def unit_vectors(table: pa.Table) -> tuple[list[str], np.ndarray]:
    good = table.filter(pc.is_null(table["error"]))
    x = np.stack([np.asarray(v, np.float32) for v in good["embedding"].to_pylist()])
    return good["key"].to_pylist(), x / np.linalg.norm(x, axis=1, keepdims=True)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """jobs/query.py in-process: (status, stdout, stderr)."""
    try:
        rc = query_cli.main(list(argv))
    except SystemExit as e:  # argparse
        rc = int(e.code or 0)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    rc, stdout, err = cli(capsys, *argv, "--json")
    assert rc == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Runs a command that must fail: status 2 and one sentence on stderr, nothing on stdout."""
    rc, stdout, err = cli(capsys, *argv)
    assert rc == 2, (argv, stdout, err)
    assert stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("."), err
    return lines[0]


def same_order(
    results: list[dict[str, Any]], keys: list[str], cosines: np.ndarray, tol: float = 1e-5
) -> None:
    """`results` are the best of `keys` by `cosines`, best first (ties within `tol` in any order)."""
    expected = dict(zip(keys, cosines.tolist()))
    got = [r["cosine"] for r in results]
    assert all(a >= b - tol for a, b in itertools.pairwise(got))
    for r in results:
        assert abs(expected[r["key"]] - r["cosine"]) <= tol
    kth = sorted(cosines, reverse=True)[len(results) - 1]
    assert min(got) >= kth - tol


# --------------------------------------------------------------------------------------------------------
# Local output


@pytest.mark.slow
@pytest.mark.integration
def test_similar_by_key_finds_the_duplicate_first_and_never_an_error_row(
    out: str, capsys: pytest.CaptureFixture[str]
) -> None:
    keys, x = unit_vectors(rows(out))
    result = cli_json(capsys, "similar", "--output", out, "--key", DUP[0], "-k", "4")
    assert result["search"] == "exact" and result["vectors"] == len(keys) and "jobs/index.py" in result["how"]
    assert [r["key"] for r in result["results"][:2]] == list(DUP)
    assert all(r["cosine"] >= 0.9999 for r in result["results"][:2])
    same_order(result["results"], keys, x @ x[keys.index(DUP[0])])

    everything = cli_json(capsys, "similar", "--output", out, "--key", DUP[1], "-k", "100")
    assert sorted(r["key"] for r in everything["results"]) == sorted(keys)  # all rows but the error row
    assert everything["results"][0]["key"] == DUP[1]

    rc, text, _ = cli(capsys, "similar", "--output", out, "--key", DUP[0], "-k", "3")
    assert rc == 0 and "exact search over" in text and DUP[1] in text
    assert len(text.strip().splitlines()) == 2 + 3  # heading, column names, three rows


@pytest.mark.slow
@pytest.mark.integration
def test_similar_by_image_embeds_it_as_the_job_did(demo: Path, out: str, capsys) -> None:
    image = demo / "data" / "sample" / "more" / "img_0005.jpg"
    result = cli_json(capsys, "similar", "--output", out, "--image", str(image), "-k", "3")
    assert result["query"] == {"image": str(image)}
    assert result["results"][0]["key"] == "more/img_0005.jpg"
    assert result["results"][0]["cosine"] >= 0.999
    keys, x = unit_vectors(rows(out))
    same_order(result["results"], keys, x @ x[keys.index("more/img_0005.jpg")], tol=1e-3)


@pytest.mark.slow
@pytest.mark.integration
def test_top_gives_the_rows_classes(out: str, tmp_path: Path, capsys) -> None:
    table = rows(out)
    row = table.filter(pc.equal(table["key"], DUP[0])).to_pylist()[0]
    result = cli_json(capsys, "top", "--output", out, "--key", DUP[0])
    assert result["source"] == "top_classes" and result["names"] is False  # random weights: no names
    assert [c["class"] for c in result["classes"]] == row["top_classes"]
    assert [c["score"] for c in result["classes"]] == pytest.approx(row["top_scores"], abs=1e-6)
    assert [c["rank"] for c in result["classes"]] == list(range(1, len(row["top_classes"]) + 1))
    rc, text, _ = cli(capsys, "top", "--output", out, "--key", DUP[0])
    assert rc == 0 and "no class names" in text and str(row["top_classes"][0]) in text

    # An output written with --topk 0 has only the logits: the classes come from them.
    headless = tmp_path / "logits-only"
    headless.mkdir()
    for path in Path(out).glob("part-*.parquet"):
        t = pq.read_table(path)
        pq.write_table(t.drop_columns(["top_classes", "top_scores"]), headless / path.name)
    from_logits = cli_json(capsys, "top", "--output", str(headless), "--key", DUP[0])
    assert from_logits["source"] == "logits"
    assert [c["class"] for c in from_logits["classes"]] == row["top_classes"]
    assert [c["score"] for c in from_logits["classes"]] == pytest.approx(row["top_scores"], abs=1e-5)


def _pairs_at_least(keys: list[str], x: np.ndarray, threshold: float) -> dict[tuple[str, str], float]:
    sims = x @ x.T
    pairs = {}
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            if sims[i, j] >= threshold:
                a, b = sorted((keys[i], keys[j]))
                pairs[(a, b)] = float(sims[i, j])
    return pairs


@pytest.mark.slow
@pytest.mark.integration
def test_dups_finds_the_copy_by_sha256_and_by_cosine(
    out: str, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = rows(out)
    keys, x = unit_vectors(table)
    sims = np.sort((x @ x.T)[np.triu_indices(len(keys), 1)])[::-1]
    # A threshold with about seven pairs above it, between two cosines that differ (pairs of the copied
    # image with a third have equal cosines).
    i = next(i for i in range(6, len(sims) - 1) if sims[i] - sims[i + 1] > 1e-5)
    threshold = float((sims[i] + sims[i + 1]) / 2)
    expected = _pairs_at_least(keys, x, threshold)

    monkeypatch.setattr(query, "BLOCK_VALUES", 3 * len(keys))  # blocks of three rows against the rest
    result = cli_json(capsys, "dups", "--output", out, "--threshold", str(threshold))
    by_sha: dict[str, list[str]] = {}
    for key, sha in zip(table["key"].to_pylist(), table["bytes_sha256"].to_pylist()):
        by_sha.setdefault(sha, []).append(key)
    assert result["exact"] == [
        {"sha256": sha, "keys": sorted(ks)} for sha, ks in by_sha.items() if len(ks) > 1
    ]
    assert result["exact"][0]["keys"] == sorted(DUP)
    near = {(p["a"], p["b"]): p["cosine"] for p in result["near"]}
    assert near.keys() == expected.keys() and not result["truncated"]
    assert all(abs(near[p] - expected[p]) < 1e-5 for p in near)
    first = result["near"][0]
    assert (
        (first["a"], first["b"]) == tuple(sorted(DUP)) and first["cosine"] >= 0.9999 and first["same_bytes"]
    )
    assert not any(p["same_bytes"] for p in result["near"][1:])
    assert result["search"] == "exact" and result["vectors"] == len(keys)

    closest = cli_json(capsys, "dups", "--output", out, "--threshold", str(threshold), "--limit", "3")
    assert closest["truncated"] and [p["cosine"] for p in closest["near"]] == [
        p["cosine"] for p in result["near"][:3]
    ]
    rc, text, _ = cli(capsys, "dups", "--output", out, "--threshold", "0.9999")
    assert rc == 0 and "1 group(s), 2 rows" in text and "same bytes" in text and "1 pair(s)" in text


@pytest.mark.slow
@pytest.mark.integration
def test_errors_and_stats(out: str, capsys) -> None:
    table = rows(out)
    bad = table.filter(pc.is_valid(table["error"])).to_pylist()
    assert [r["key"] for r in bad] == [BROKEN]
    result = cli_json(capsys, "errors", "--output", out, "--list")
    assert result["rows"] == table.num_rows and result["error_rows"] == 1
    assert result["errors"] == [{"error": bad[0]["error"], "count": 1, "keys": [BROKEN]}]
    rc, text, _ = cli(capsys, "errors", "--output", out)
    assert rc == 0 and f"1 of {table.num_rows} rows" in text and bad[0]["error"] in text

    files = sorted(Path(out).glob("part-*.parquet"))
    footer = footer_metadata(pq.ParquetFile(files[-1]))
    stats = cli_json(capsys, "stats", "--output", out)
    assert stats["rows"] == table.num_rows and stats["error_rows"] == 1
    run_ids = table["run_id"].unique().to_pylist()
    assert stats["runs"] == [{"run_id": run_ids[0], "rows": table.num_rows, "error_rows": 1}]
    assert stats["data_files"] == len(files) and stats["data_bytes"] == sum(f.stat().st_size for f in files)
    for field in ("model", "weights", "weights_sha256", "seed", "image_size", "patch_size", "mean", "std"):
        assert stats["model"][field] == footer[field]
    assert stats["schema_version"] == SCHEMA_VERSION
    assert [c["name"] for c in stats["columns"]] == table.schema.names
    assert stats["embedding"] == {"dim": 192, "dtype": "float32"} and stats["class_names"] is False
    assert stats["index"] == {"exists": False}
    rc, text, _ = cli(capsys, "stats", "--output", out)
    assert rc == 0 and run_ids[0] in text and "index:      none" in text


@pytest.mark.slow
@pytest.mark.integration
def test_refusals_are_one_sentence_with_status_2(out: str, tmp_path: Path, capsys) -> None:
    assert "no row with the key 'nope.jpg'" in refused(capsys, "top", "--output", out, "--key", "nope.jpg")
    assert "no row with the key" in refused(capsys, "similar", "--output", out, "--key", "nope.jpg")
    assert "error row" in refused(capsys, "similar", "--output", out, "--key", BROKEN)
    assert "error row" in refused(capsys, "top", "--output", out, "--key", BROKEN)
    assert "There is no output at" in refused(capsys, "stats", "--output", str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    assert "holds no data files" in refused(capsys, "errors", "--output", str(tmp_path / "empty"))
    assert "Cannot read the image" in refused(
        capsys, "similar", "--output", out, "--image", str(tmp_path / "missing.jpg")
    )
    (tmp_path / "notes.jpg").write_text("hello")
    assert "Cannot decode the image" in refused(
        capsys, "similar", "--output", out, "--image", str(tmp_path / "notes.jpg")
    )
    for argv in (
        ["similar", "--output", out, "--key", DUP[0], "-k", "0"],
        ["similar", "--output", out],
        ["similar", "--output", out, "--key", DUP[0], "--weights", "x.pth"],
        ["dups", "--output", out, "--threshold", "1.5"],
        ["stats"],
        ["stats", "--output", " "],
        ["search", "--output", out],
    ):
        refused(capsys, *argv)

    # Recorded weights that do not open here: refused, naming them.
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in Path(out).glob("part-*.parquet"):
        t = pq.read_table(path)
        meta = dict(t.schema.metadata or {})
        meta[b"vit_embed.weights"] = b"/models/gone/vit_ti_16.pth"
        meta[b"vit_embed.weights_sha256"] = b"ab" * 32
        pq.write_table(t.replace_schema_metadata(meta), moved / path.name)
    image = str(Path(out).parent.parent / "data" / "sample" / DUP[0])
    sentence = refused(capsys, "similar", "--output", str(moved), "--image", image)
    assert "/models/gone/vit_ti_16.pth cannot be opened" in sentence and "--weights" in sentence

    # The command as users run it.
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "query.py"), "top", "--output", out, "--key", "nope.jpg"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"error: {out} has no row with the key 'nope.jpg'; `stats` shows what it holds."
    ]


@pytest.mark.slow
@pytest.mark.integration
def test_similar_and_dups_use_a_current_index(out: str, tmp_path: Path, capsys) -> None:
    from pipeline.vector_index import build_index

    copy = tmp_path / "indexed"
    shutil.copytree(out, copy)
    exact = cli_json(capsys, "similar", "--output", str(copy), "--key", DUP[0], "-k", "5")
    build_index(str(copy))
    stats = cli_json(capsys, "stats", "--output", str(copy))
    assert stats["index"]["exists"] and stats["index"]["current"] and stats["index"]["kind"] == "flat"

    indexed = cli_json(capsys, "similar", "--output", str(copy), "--key", DUP[0], "-k", "5")
    assert indexed["search"] == "index" and indexed["index_kind"] == "flat" and "index" in indexed["how"]
    assert [r["key"] for r in indexed["results"][:2]] == list(DUP)
    assert {r["key"] for r in indexed["results"]} == {r["key"] for r in exact["results"]}
    dups = cli_json(capsys, "dups", "--output", str(copy), "--threshold", "0.9999")
    assert dups["search"] == "index"
    assert [(p["a"], p["b"], p["same_bytes"]) for p in dups["near"]] == [(*sorted(DUP), True)]

    # A data file replaced after the build (as --retry-errors does): the index no longer covers it.
    data_file = next(copy.glob("part-*.parquet"))
    os.utime(data_file, ns=(data_file.stat().st_atime_ns, data_file.stat().st_mtime_ns + 10**9))
    stale = cli_json(capsys, "similar", "--output", str(copy), "--key", DUP[0], "-k", "5")
    assert stale["search"] == "exact" and "does not cover 1 new or changed" in stale["how"]
    assert cli_json(capsys, "stats", "--output", str(copy))["index"]["current"] is False


# --------------------------------------------------------------------------------------------------------
# S3 output


@pytest.mark.slow
@pytest.mark.integration
def test_the_same_through_an_s3_output(s3_output: tuple[str, Path], demo: Path, out: str, capsys) -> None:
    uri, copy = s3_output
    table = rows(copy)
    keys, x = unit_vectors(table)

    stats = cli_json(capsys, "stats", "--output", uri)
    assert stats["rows"] == table.num_rows == rows(out).num_rows and stats["error_rows"] == 1
    assert stats["embedding"] == {"dim": 192, "dtype": "float16"} and stats["class_names"] is True
    assert stats["model"]["preprocess"] == "exact"  # what similar --image reproduces
    assert "logits" not in [c["name"] for c in stats["columns"]]

    similar = cli_json(capsys, "similar", "--output", uri, "--key", DUP[0], "-k", "4")
    assert similar["search"] == "exact" and [r["key"] for r in similar["results"][:2]] == list(DUP)
    same_order(similar["results"], keys, x @ x[keys.index(DUP[0])], tol=1e-4)

    image = demo / "data" / "sample" / "img_0003.jpg"
    by_image = cli_json(capsys, "similar", "--output", uri, "--image", str(image), "-k", "2")
    assert by_image["results"][0]["key"] == "img_0003.jpg" and by_image["results"][0]["cosine"] >= 0.999

    row = table.filter(pc.equal(table["key"], DUP[1])).to_pylist()[0]
    top = cli_json(capsys, "top", "--output", uri, "--key", DUP[1])
    assert top["names"] and [c["name"] for c in top["classes"]] == row["top_names"]
    assert [c["class"] for c in top["classes"]] == row["top_classes"] and len(row["top_classes"]) == 3
    assert row["top_names"][0] == f"class {row['top_classes'][0]:03d}"

    errors = cli_json(capsys, "errors", "--output", uri, "--list")
    assert errors["errors"] == cli_json(capsys, "errors", "--output", out, "--list")["errors"]
    dups = cli_json(capsys, "dups", "--output", uri, "--threshold", "0.999")
    assert dups["exact"][0]["keys"] == sorted(DUP)
    assert (dups["near"][0]["a"], dups["near"][0]["b"]) == tuple(sorted(DUP))
    assert "no row with the key" in refused(capsys, "top", "--output", uri, "--key", "nope.jpg")
    assert "holds no data files" in refused(capsys, "stats", "--output", uri.replace("query out#1", "void"))

    from pipeline.vector_index import build_index

    build_index(uri)
    indexed = cli_json(capsys, "similar", "--output", uri, "--key", DUP[0], "-k", "4")
    assert indexed["search"] == "index" and [r["key"] for r in indexed["results"][:2]] == list(DUP)

    env = {**os.environ, **TEST_AWS_ENV}
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "query.py"), "stats", "--output", uri, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    from_cli = json.loads(done.stdout)
    assert from_cli["rows"] == table.num_rows and from_cli["index"]["current"] is True


# --------------------------------------------------------------------------------------------------------
# docs/querying.md


def recipes() -> list[tuple[str, str, str]]:
    """(name, language, code) of every ```sql and ```python block of docs/querying.md, named by the
    `<!-- recipe: NAME -->` line above it; blocks marked `<!-- not tested: … -->` are left out."""
    found = []
    blocks = re.finditer(
        r"(?:<!-- (recipe|not tested): ([^>]*?) -->\n)?```(\w+)\n(.*?)```", DOCS.read_text(), re.S
    )
    for block in blocks:
        marker, name, lang, code = block.groups()
        if lang not in ("sql", "python"):
            continue
        assert marker, f"docs/querying.md has a {lang} block without a recipe marker:\n{code}"
        if marker == "recipe":
            found.append((name.strip(), lang, code))
    return found


CHECKED = {  # the recipes test_docs_recipes_run_on_job_output checks
    "sql-neighbours",
    "sql-top-names",
    "sql-class-counts",
    "sql-errors",
    "sql-exact-dups",
    "sql-join",
    "sql-footer",
    "polars-scan",
    "polars-neighbours",
    "pyarrow-key",
    "pyarrow-s3",
    "pyarrow-s3-duckdb",
}


def test_docs_recipes_are_all_named_and_checked() -> None:
    names = [name for name, _, _ in recipes()]
    assert len(names) == len(set(names)) and set(names) == CHECKED
    assert "<!-- not tested: Spark -->\n```python" in DOCS.read_text()


def _run_sql(code: str) -> list[list[tuple]]:
    import duckdb

    con = duckdb.connect()
    return [con.sql(s).fetchall() for s in (s.strip() for s in code.split(";")) if s]


@pytest.mark.slow
@pytest.mark.integration
def test_docs_recipes_run_on_job_output(
    out: str, s3_output: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    uri, photos = s3_output
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "demo").symlink_to(out, target_is_directory=True)
    (tmp_path / "out" / "photos").symlink_to(photos, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    demo, named = rows(out), rows(photos)
    keys, x = unit_vectors(demo)
    good = demo.filter(pc.is_null(demo["error"])).to_pylist()
    bad = demo.filter(pc.is_valid(demo["error"])).to_pylist()
    labelled = [r["key"] for r in good[:4]] + ["not/in/the/output.jpg"]
    (tmp_path / "labels.csv").write_text(
        "key,label\n" + "".join(f"{k},label {i}\n" for i, k in enumerate(labelled))
    )
    bucket, prefix = split_s3_uri(uri)

    ran = set()
    ns: dict[str, Any] = {}  # the Python recipes run one after the other, as in one session
    for name, lang, code in recipes():
        if lang == "sql":
            results = _run_sql(code)
        else:
            code = code.replace('"embeddings/photos"', repr(f"{bucket}/{prefix}"))
            exec(compile(code, f"docs/querying.md:{name}", "exec"), ns)
            printed = capsys.readouterr().out
            assert printed.strip(), f"{name} printed nothing"
        ran.add(name)
        if name == "sql-neighbours":
            (nearest,) = results
            assert {k for k, _ in nearest[:2]} == set(DUP)  # the image and its copy, in either order
            same_order([{"key": k, "cosine": c} for k, c in nearest], keys, x @ x[keys.index(DUP[0])])
            assert len(nearest) == min(10, len(keys)) and BROKEN not in [k for k, _ in nearest]
        elif name == "sql-top-names":
            (ranked,) = results
            ok = {r["key"]: r for r in named.to_pylist() if r["error"] is None}
            assert sorted(k for k, _, _, _ in ranked) == sorted(ok)
            for key, name_1, score, top in ranked:
                assert name_1 == ok[key]["top_names"][0] and list(top) == ok[key]["top_names"]
                assert score == pytest.approx(ok[key]["top_scores"][0], abs=1e-3)
            assert [s for _, _, s, _ in ranked] == sorted((s for _, _, s, _ in ranked), reverse=True)
        elif name == "sql-class-counts":
            (counts,) = results
            expected: dict[int, int] = {}
            for r in good:
                expected[r["top_classes"][0]] = expected.get(r["top_classes"][0], 0) + 1
            assert dict(counts) == expected
        elif name == "sql-errors":
            by_message, by_stage = results
            assert by_message == [(bad[0]["error"], 1, [BROKEN])]
            assert by_stage == [(bad[0]["error"].split(":")[0], 1)]
        elif name == "sql-exact-dups":
            (groups,) = results
            assert [(sorted(g)) for _, g in groups] == [sorted(DUP)]
        elif name == "sql-join":
            (joined,) = results
            by_key = {r["key"]: r for r in good}
            label = {k: f"label {i}" for i, k in enumerate(labelled)}
            assert joined == [
                (k, label[k], by_key[k]["top_classes"][0], by_key[k]["width"], by_key[k]["height"])
                for k in sorted(labelled[:4])
            ]
        elif name == "sql-footer":
            (footer_rows,) = results
            footer = footer_metadata(pq.ParquetFile(next(Path(out).glob("part-*.parquet"))))
            assert footer_rows == sorted(
                (f"vit_embed.{k}", footer[k])
                for k in ("model", "weights", "weights_sha256", "image_size", "schema_version")
            )
        elif name == "polars-scan":
            assert ns["ok"].rows() == sorted(
                (r["key"], r["width"], r["height"], r["top_classes"][0]) for r in good
            )
        elif name == "polars-neighbours":
            nearest_df = ns["nearest"]
            same_order(nearest_df.to_dicts(), keys, x @ x[keys.index(DUP[0])])
            assert set(nearest_df["key"].to_list()[:2]) == set(DUP)
        elif name == "pyarrow-key":
            got = {r["key"]: r for r in ns["rows"].to_pylist()}
            assert got.keys() == {"img_0000.jpg", "img_0001.jpg"}
            assert got["img_0001.jpg"]["top_classes"] == next(
                r["top_classes"] for r in good if r["key"] == "img_0001.jpg"
            )
            assert ns["footer"]["model"] == "vit_ti_16"
        elif name == "pyarrow-s3":
            (row,) = ns["row"].to_pylist()
            assert row["top_names"] == next(
                r["top_names"] for r in named.to_pylist() if r["key"] == "img_0000.jpg"
            )
            assert len(ns["files"]) == len(list(photos.glob("part-*.parquet")))
        elif name == "pyarrow-s3-duckdb":
            counts_by_name: dict[str, int] = {}
            for r in named.to_pylist():
                if r["error"] is None:
                    counts_by_name[r["top_names"][0]] = counts_by_name.get(r["top_names"][0], 0) + 1
            assert dict(ns["best"]) == counts_by_name
        else:
            raise AssertionError(f"no check for the recipe {name}")
    assert ran == CHECKED
