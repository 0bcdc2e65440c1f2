"""The vector index over an output's embeddings: search, incremental updates, refusals, crash safety, the CLI.

Outputs are written with the job's own writer (pipeline.sink), so files, footers and dtypes are the job's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pipeline import vector_index
from pipeline.sink import OutputSpec, to_table, write_parquet
from pipeline.storage import make_dirs, resolve_uri
from pipeline.vector_index import VectorIndex, VectorIndexError, build_index

REPO = Path(__file__).resolve().parent.parent
DIM = 48
MODEL = {"model": "vit_ti_16", "weights_sha256": "ab" * 32, "seed": ""}


@pytest.fixture(autouse=True)
def _one_faiss_thread() -> Iterator[None]:
    """Builds on one thread: these indexes are small, and OpenMP's second thread only waits for a core when
    other tests load the machine."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _vectors(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    """Clustered vectors (as embeddings are): 20 centres plus noise."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((20, dim))
    return (centres[rng.integers(20, size=n)] + 0.7 * rng.standard_normal((n, dim))).astype(np.float32)


def _write(
    output: str,
    name: str,
    vectors: np.ndarray,
    keys: list[str] | None = None,
    *,
    bad: set[int] = frozenset(),  # type: ignore[assignment]
    dtype: str = "float32",
    model: dict[str, str] = MODEL,
    run_id: str = "run1",
) -> list[str]:
    """Writes a data file as the job does; returns the keys of its good rows."""
    n, dim = vectors.shape
    keys = keys or [f"{name}/img{i:05d}.jpg" for i in range(n)]
    spec = OutputSpec(embedding_dim=dim, num_classes=3, embedding_dtype=dtype)
    schema = spec.schema(model | {"run_id": run_id})
    batch = {
        "key": np.array(keys, dtype=object),
        "embedding": vectors,
        "logits": np.zeros((n, 3), np.float32),
        "error": np.array([f"decode: broken file {i}" if i in bad else None for i in range(n)], dtype=object),
    }
    fs, root = resolve_uri(output)
    make_dirs(fs, root)
    write_parquet([to_table(batch, spec, schema)], fs, f"{root}/{name}", schema)
    return [k for i, k in enumerate(keys) if i not in bad]


def _exact(vectors: np.ndarray, keys: list[str], query: np.ndarray, k: int) -> list[str]:
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    order = np.argsort(-(x @ (query / np.linalg.norm(query))), kind="stable")[:k]
    return [keys[i] for i in order]


def _index_keys(output: str) -> list[str]:
    vi = VectorIndex.open(output)
    assert vi is not None
    return vi.keys.to_pylist()


def test_no_index_opens_as_none(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    _write(out, "part-run1-u000000.parquet", _vectors(10, 0))
    assert VectorIndex.open(out) is None
    assert VectorIndex.open(str(tmp_path / "nowhere")) is None


def test_flat_search_is_exact_and_a_duplicate_image_finds_its_other_key(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    a, b = _vectors(1500, 1), _vectors(1500, 2)
    b[700] = a[3]  # the same image stored under two keys: identical embeddings
    keys_a = _write(out, "part-run1-u000000.parquet", a, run_id="run1")
    keys_b = _write(out, "part-run2-u000000.parquet", b, run_id="run2")

    summary = build_index(out)
    assert (summary["kind"], summary["vectors"], summary["files"]) == ("flat", 3000, 2)
    assert summary["run_ids"] == ["run1", "run2"]
    assert summary["model"] == MODEL | {"embedding_dim": DIM}

    vi = VectorIndex.open(out)
    assert vi is not None and vi.vectors == 3000 and vi.kind == "flat" and vi.dim == DIM
    assert sorted(vi.files) == ["part-run1-u000000.parquet", "part-run2-u000000.parquet"]
    assert vi.stale() == []
    (hits,) = vi.search(a[3], 5)
    assert {key for key, _ in hits[:2]} == {keys_a[3], keys_b[700]}
    assert [s for _, s in hits[:2]] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert all(s < 0.999 for _, s in hits[2:])

    everything, keys = np.concatenate([a, b]), keys_a + keys_b
    queries = _vectors(20, 3)
    results = vi.search(queries, 10)
    assert len(results) == 20
    for query, hits in zip(queries, results):
        assert [key for key, _ in hits] == _exact(everything, keys, query, 10)
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_find_near_duplicates(tmp_path: Path, kind: str) -> None:
    out = str(tmp_path / "out")
    x = _vectors(2500, 4)
    x[2000] = x[10] * 3.0  # the same direction: cosine 1
    keys = _write(out, "part-run1-u000000.parquet", x)
    summary = build_index(out, kind=kind)
    assert summary["kind"] == kind and summary["vectors"] == 2500

    vi = VectorIndex.open(out)
    assert vi is not None
    (hits,) = vi.search(x[10:11], 3)
    assert {key for key, _ in hits[:2]} == {keys[10], keys[2000]}
    assert hits[1][1] == pytest.approx(1.0, abs=1e-5)
    queries = _vectors(50, 5)
    found = vi.search(queries, 10)
    recall = np.mean(
        [len({k for k, _ in h} & set(_exact(x, keys, q, 10))) / 10 for q, h in zip(queries, found)]
    )
    assert recall >= 0.9


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_update_reads_only_new_and_replaced_files(tmp_path: Path, kind: str) -> None:
    out = str(tmp_path / "out")
    first, second, third = (
        "part-run1-u000000.parquet",
        "part-run1-u000001.parquet",
        "part-run2-u000000.parquet",
    )
    a, b = _vectors(1200, 6), _vectors(400, 7)
    _write(out, first, a)
    _write(out, second, b, bad={5, 6, 7})
    build_index(out, kind=kind)
    assert VectorIndex.open(out).vectors == 1597  # type: ignore[union-attr]

    # A later run adds a file.
    c = _vectors(400, 8)
    _write(out, third, c, run_id="run2")
    vi = VectorIndex.open(out)
    assert vi is not None and vi.stale() == [third]
    summary = build_index(out)
    assert summary["kind"] == kind  # an explicit kind stays
    assert (summary["files_added"], summary["files_changed"], summary["files_read"]) == (1, 0, 1)
    assert (summary["vectors_added"], summary["vectors_removed"], summary["vectors"]) == (400, 0, 1997)
    assert summary["run_ids"] == ["run1", "run2"]

    # A rerun with --retry-errors replaces the second file: its error rows become good rows (and one row's
    # embedding differs, as a re-decoded image may).
    old_row = b[100].copy()
    b[100] = _vectors(1, 9)[0]
    _write(out, second, b)
    assert VectorIndex.open(out).stale() == [second]  # type: ignore[union-attr]
    summary = build_index(out)
    assert (summary["files_added"], summary["files_changed"], summary["files_read"]) == (0, 1, 1)
    assert (summary["vectors_added"], summary["vectors_removed"], summary["vectors"]) == (400, 397, 2000)
    assert summary["rebuilt"] is False

    keys = _index_keys(out)
    assert len(keys) == len(set(keys)) == 2000
    assert {f"{second}/img00005.jpg", f"{second}/img00007.jpg"} <= set(keys)
    vi = VectorIndex.open(out)
    assert vi is not None and vi.stale() == [] and vi.vectors == 2000
    (hits,) = vi.search(b[100], 1)
    assert hits[0] == (f"{second}/img00100.jpg", pytest.approx(1.0, abs=1e-5))
    (hits,) = vi.search(old_row, 1)  # the row's old vector is gone
    assert hits[0][1] < 0.999
    assert build_index(out)["updated"] is False  # nothing changed: nothing read or written


def test_footer_prefix_is_the_sinks() -> None:
    from pipeline import sink

    assert vector_index.METADATA_PREFIX == sink.METADATA_PREFIX


def test_error_rows_are_skipped_and_float16_embeddings_are_read(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    x = _vectors(800, 10)
    good = _write(out, "part-run1-u000000.parquet", x, bad={0, 1, 500}, dtype="float16")
    summary = build_index(out)
    assert summary["vectors"] == 797
    keys = set(_index_keys(out))
    assert keys == set(good)
    vi = VectorIndex.open(out)
    assert vi is not None
    (hits,) = vi.search(x[2].astype(np.float16), 1)
    assert hits[0][0] == good[0] and hits[0][1] == pytest.approx(1.0, abs=1e-3)


def test_outputs_of_different_models_are_refused(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    _write(out, "part-run1-u000000.parquet", _vectors(300, 11))
    build_index(out)
    before = VectorIndex.open(out)
    other = MODEL | {"weights_sha256": "cd" * 32}
    _write(out, "part-run2-u000000.parquet", _vectors(300, 12), model=other, run_id="run2")
    with pytest.raises(VectorIndexError) as refused:
        build_index(out)
    message = str(refused.value)
    assert "part-run2-u000000.parquet" in message and "cdcdcdcd" in message and "abababab" in message
    assert message.count(". ") == 0 and message.endswith(".")
    after = VectorIndex.open(out)
    assert after is not None and before is not None and after.generation == before.generation

    with pytest.raises(VectorIndexError, match="own directory"):  # the same without an index
        build_index(out, rebuild=True)
    wider = str(tmp_path / "wider")
    _write(wider, "part-run1-u000000.parquet", _vectors(30, 13))
    _write(wider, "part-run2-u000000.parquet", _vectors(30, 13, dim=DIM * 2), run_id="run2")
    with pytest.raises(VectorIndexError, match=f"{2 * DIM}-d"):
        build_index(wider)


def test_a_build_that_stops_before_the_manifest_leaves_the_previous_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = str(tmp_path / "out")
    a = _vectors(1000, 14)
    _write(out, "part-run1-u000000.parquet", a)
    first = build_index(out)
    _write(out, "part-run2-u000000.parquet", _vectors(500, 15), run_id="run2")

    def crash(*args: object) -> None:
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(vector_index.storage, "move", crash)
    with pytest.raises(RuntimeError):
        build_index(out)
    monkeypatch.undo()
    index_dir = tmp_path / "out" / "_index"
    assert len([p for p in index_dir.iterdir() if p.is_dir()]) == 2  # the previous and the unfinished one

    vi = VectorIndex.open(out)
    assert vi is not None and vi.generation == first["generation"] and vi.vectors == 1000
    assert vi.stale() == ["part-run2-u000000.parquet"]
    (hits,) = vi.search(a[0], 1)
    assert hits[0][1] == pytest.approx(1.0, abs=1e-5)

    second = build_index(out)
    third = build_index(out, rebuild=True)
    assert (second["vectors"], third["vectors"], third["rebuilt"]) == (1500, 1500, True)
    # The unfinished generation and the first are gone; the one a reader may still have open stays.
    left = sorted(p.name for p in index_dir.iterdir() if p.is_dir())
    assert left == sorted([second["generation"], third["generation"]])


def test_auto_moves_from_exact_to_ivf_as_the_output_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vector_index, "FLAT_MAX_VALUES", 1500 * DIM)
    out = str(tmp_path / "out")
    _write(out, "part-run1-u000000.parquet", _vectors(1000, 16))
    assert build_index(out)["kind"] == "flat"
    _write(out, "part-run2-u000000.parquet", _vectors(1000, 17), run_id="run2")
    summary = build_index(out)
    assert (summary["kind"], summary["rebuilt"], summary["files_read"], summary["vectors"]) == (
        "ivf",
        True,
        2,
        2000,
    )
    assert summary["params"]["nprobe"] >= 1 and summary["params"]["trained_on"] == 2000


def test_ivf_trains_on_a_sample_drawn_from_every_file() -> None:
    parts = [
        np.full((n, 2), i, np.float32) + np.arange(n, dtype=np.float32)[:, None] / n
        for i, n in enumerate([500, 30, 1500])
    ]
    sample = vector_index._training_sample(parts, 400)
    assert sample.shape == (400, 2) and len(np.unique(sample[:, 0])) == 400
    assert set(np.floor(sample[:, 0]).astype(int)) == {0, 1, 2}
    assert vector_index._training_sample(parts, 5000).shape == (2030, 2)


def test_search_checks_its_queries(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    x = _vectors(50, 18)
    _write(out, "part-run1-u000000.parquet", x)
    build_index(out)
    vi = VectorIndex.open(out)
    assert vi is not None
    with pytest.raises(VectorIndexError, match=f"{DIM} numbers"):
        vi.search(np.zeros((2, DIM + 1), np.float32), 3)
    assert [len(h) for h in vi.search(x[:2], 100)] == [50, 50]  # k beyond the index: everything
    assert vi.search(np.zeros((0, DIM), np.float32), 3) == []


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "index.py"), *args], capture_output=True, text=True, timeout=120
    )


def _one_sentence(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_cli_prints_a_summary_and_a_json_last_line(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    _write(out, "part-run1-u000000.parquet", _vectors(300, 19), bad={3})
    done = _cli("--output", out)
    assert done.returncode == 0, done.stderr
    *text, last = done.stdout.strip().splitlines()
    summary = json.loads(last)
    assert (summary["vectors"], summary["kind"], summary["files"], summary["updated"]) == (
        299,
        "flat",
        1,
        True,
    )
    assert any("299 vectors" in line for line in text)


def test_cli_refuses_mixed_models_with_status_2_and_one_sentence(tmp_path: Path) -> None:
    mixed = str(tmp_path / "mixed")
    _write(mixed, "part-run1-u000000.parquet", _vectors(20, 20))
    _write(mixed, "part-run2-u000000.parquet", _vectors(20, 21), model=MODEL | {"model": "vit_b_16"})
    refused = _cli("--output", mixed)
    assert refused.returncode == 2 and refused.stdout == ""
    assert "vit_b_16" in _one_sentence(refused.stderr)


def test_cli_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same command in this process (each subprocess costs seconds of start-up on 2 cores)."""
    from jobs.index import main

    assert main(["--output", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in _one_sentence(capsys.readouterr().err)
    with pytest.raises(SystemExit) as bad_kind:
        main(["--output", str(tmp_path), "--kind", "lsh"])
    assert bad_kind.value.code == 2 and "--kind" in _one_sentence(capsys.readouterr().err)
    out = str(tmp_path / "out")
    _write(out, "part-run1-u000000.parquet", _vectors(300, 19))
    assert main(["--output", out]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["kind"] == "flat"
    assert main(["--output", out, "--kind", "hnsw"]) == 0
    again = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (again["kind"], again["rebuilt"], again["vectors"]) == ("hnsw", True, 300)
    assert main(["--output", out]) == 0  # auto keeps the kind asked for
    same = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (same["kind"], same["updated"], same["generation"]) == ("hnsw", False, again["generation"])


@pytest.mark.slow  # the S3 server's start-up, when no other test started it
def test_s3_output_with_literal_keys(s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    out = f"s3://{s3_bucket}/emb #1+%20?"
    a = _vectors(600, 22)
    keys = _write(out, "part-run1-u000000.parquet", a)
    assert VectorIndex.open(out) is None
    assert build_index(out)["vectors"] == 600
    _write(out, "part-run2-u000000.parquet", _vectors(200, 23), run_id="run2")
    vi = VectorIndex.open(out)
    assert vi is not None and vi.stale() == ["part-run2-u000000.parquet"]
    summary = build_index(out)
    assert (summary["files_read"], summary["vectors"]) == (1, 800)

    vi = VectorIndex.open(out)
    assert vi is not None and vi.stale() == [] and vi.run_ids == ["run1", "run2"]
    (hits,) = vi.search(a[42], 1)
    assert hits[0] == (keys[42], pytest.approx(1.0, abs=1e-5))
    s3 = boto3.client("s3", endpoint_url=s3_server)
    names = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    index_objects = sorted(n.removeprefix("emb #1+%20?/_index/") for n in names if "/_index/" in n)
    assert index_objects[-1] == "index.json" and len(index_objects) == 5  # two generations' files
    assert not [n for n in names if n.endswith("/")]  # no directory markers
