"""What users do every week: runs that overlap, fixing an input and retrying its error rows, killing a
long run. Every test checks the output key by key: each input key exactly once."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from pipeline.embed import FakeEmbedPatches
from pipeline.run import run
from pipeline.sample import encode, photo_like
from tests.conftest import job_env, small_config
from tests.ray_head import RayHead

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--model", "vit_ti_16", "--weights", "random", "--image-size", "32", "--batch-size", "16"]
FAKE = {"embedding_dim": 192, "num_classes": 1000}


_config = small_config


def _images(root: Path, n: int, seed: int = 0) -> set[str]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"img{i:04d}.jpg").write_bytes(encode(photo_like(rng, 40, 30)))
    return {f"img{i:04d}.jpg" for i in range(n)}


def _table(output: str):
    if output.startswith("s3://"):
        fs, path = (
            pafs.S3FileSystem(
                endpoint_override=os.environ["AWS_ENDPOINT_URL"].split("://", 1)[1], scheme="http"
            ),
            output[len("s3://") :],
        )
    else:
        fs, path = pafs.LocalFileSystem(), output
    files = [
        i.path
        for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if i.base_name.endswith(".parquet")
    ]
    return pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=["key", "error"])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_runs_started_together_or_seconds_apart_write_every_key_once(
    tmp_path: Path, where: str, request, ray_cluster: RayHead
):
    """Scheduled runs overlapping on one cluster: each job is a driver on the tests' Ray (RAY_ADDRESS)."""
    expected = _images(tmp_path / "in", 120)
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        output = f"s3://{bucket}/emb"
    else:
        output = str(tmp_path / "out")
    src = str(tmp_path / "in")  # absolute: the cluster's workers do not run in the job's directory
    cmd = [sys.executable, str(REPO / "jobs" / "embed.py"), "--input", src, "--output", output, *SMALL]
    results = []
    rounds = ([0, 0, 0], [0, 3, 6]) if where == "local" else ([0, 0, 0],)  # together, then seconds apart
    for delays in rounds:
        procs = []
        for d in delays:
            time.sleep(d - (delays[len(procs) - 1] if procs else 0))
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=tmp_path,
                    env=job_env(ray_cluster),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for p in procs:
            out, err = p.communicate(timeout=300)
            results.append((p.returncode, out, err))
    codes = [code for code, _, _ in results]
    assert set(codes) <= {0, 2}, [err[-2000:] for _, _, err in results]
    assert codes.count(0) >= len(rounds), codes  # one run of each round did its work or found it done
    for code, _, err in results:
        if code == 2:
            assert "is in use by run" in err and "Traceback" not in err, err[-2000:]
    keys = Counter(_table(output)["key"].to_pylist())
    assert set(keys) == expected and max(keys.values()) == 1, "a key is missing or written twice"
    processed = sum(
        json.loads(out.strip().splitlines()[-1])["processed"] for code, out, _ in results if code == 0
    )
    assert processed == len(expected)


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_retry_errors_replaces_the_error_rows_of_fixed_inputs(tmp_path: Path, ray_local: None):
    src, out = tmp_path / "in", tmp_path / "out"
    rng = np.random.default_rng(3)
    good = _images(src / "files", 6)
    (src / "files" / "broken.jpg").write_bytes(b"this is not an image")
    jpg = [encode(photo_like(rng, 40, 30)) for _ in range(4)]
    _tar(src / "shard.tar", {"a.jpg": jpg[0], "b.jpg": b"not a jpeg either", "c.jpg": jpg[1]})
    cfg = _config(
        src,
        out,
        batch_size=8,
        format="files",
        commit_interval_s=0,
    )
    first = run(cfg)
    assert first.errors == 2 and first.processed == len(good) + 1 + 1  # loose files + the tar as one file
    rows = {k: e for k, e in zip(*[_table(str(out))[c].to_pylist() for c in ("key", "error")])}
    assert rows["files/broken.jpg"] is not None

    # The user fixes the broken file. A plain rerun has nothing new to do ...
    (src / "files" / "broken.jpg").write_bytes(jpg[2])
    (src / "shard.tar").unlink()
    files_before = sorted(p.name for p in out.glob("*.parquet"))
    again = run(cfg)
    assert again.processed == 0 and again.retried == 0
    # ... and --retry-errors re-reads the error rows' inputs and replaces those rows in their files.
    retried = run(dataclasses.replace(cfg, retry_errors=True))
    assert retried.retried == 1 and retried.processed == 1, retried
    assert any("no longer under --input" in n for n in retried.notes), retried.notes
    table = _table(str(out))
    keys = Counter(table["key"].to_pylist())
    assert max(keys.values()) == 1 and set(keys) == {f"files/{k}" for k in good} | {
        "files/broken.jpg",
        "shard.tar",
    }
    rows = dict(zip(table["key"].to_pylist(), table["error"].to_pylist()))
    assert rows["files/broken.jpg"] is None, "the fixed file is embedded now"
    assert rows["shard.tar"] is not None, "an input that is gone keeps its error row"
    assert sorted(p.name for p in out.glob("*.parquet")) == files_before, "rows replaced in their own files"
    last = run(dataclasses.replace(cfg, retry_errors=True))  # only the gone input's row is left
    assert last.retried == 0 and any("no longer under --input" in n for n in last.notes)


def test_retry_errors_rereads_only_the_failed_samples_of_a_tar(tmp_path: Path, ray_local: None):
    src, out = tmp_path / "in", tmp_path / "out"
    rng = np.random.default_rng(4)
    jpg = [encode(photo_like(rng, 40, 30)) for _ in range(3)]
    _tar(src.mkdir() or src / "s.tar", {"a.jpg": jpg[0], "b.jpg": b"broken", "c.jpg": jpg[1]})
    cfg = _config(
        src,
        out,
        batch_size=8,
        commit_interval_s=0,
    )
    assert run(cfg).errors == 1
    before = dict(zip(*[_table(str(out))[c].to_pylist() for c in ("key", "error")]))
    _tar(src / "s.tar", {"a.jpg": jpg[0], "b.jpg": jpg[2], "c.jpg": jpg[1]})
    summary = run(dataclasses.replace(cfg, retry_errors=True))
    assert summary.retried == 1 and summary.processed == 1 and summary.errors == 0
    after = dict(zip(*[_table(str(out))[c].to_pylist() for c in ("key", "error")]))
    assert set(after) == set(before) == {"s.tar#a", "s.tar#b", "s.tar#c"}
    assert before["s.tar#b"] is not None and after["s.tar#b"] is None


def test_units_commit_while_the_run_goes_on(tmp_path: Path, ray_local: None):
    """--commit-interval is honoured: with a slow model (ViT-Ti at 224 px on a CPU actor, by the planner's
    estimate; the fake model takes 0.3 s per 16 images), committed rows become visible long before the run
    ends, so a kill loses at most the units in flight."""
    src, out = tmp_path / "in", tmp_path / "out"
    rng = np.random.default_rng(5)
    src.mkdir()
    for t in range(30):  # 30 units of 20 images
        _tar(src / f"s{t:02d}.tar", {f"i{i:02d}.jpg": encode(photo_like(rng, 40, 30)) for i in range(20)})
    cfg = _config(src, out, batch_size=16, commit_interval_s=1.0, image_size=224)
    first_visible: list[float] = []
    result: dict = {}

    def job() -> None:
        result["summary"] = run(cfg, embedder=FakeEmbedPatches, embedder_kwargs={**FAKE, "delay_s": 0.3})

    thread = threading.Thread(target=job)
    start = time.time()
    thread.start()
    while thread.is_alive():
        if not first_visible and list(out.glob("*.parquet")):
            first_visible.append(time.time() - start)
        time.sleep(0.05)
    thread.join()
    total = time.time() - start
    summary = result["summary"]
    assert summary.processed == 600
    commits = len(list((out / "_runs" / summary.run_id).glob("commit-*.json")))
    assert first_visible and first_visible[0] < total - 5, (first_visible, total)
    assert commits >= 3, commits


def test_a_wrong_image_column_is_refused_before_any_row_and_the_fixed_command_runs(
    tmp_path: Path, ray_local: None
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.sources import InputError

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(6)
    images = [encode(photo_like(rng, 40, 30)) for _ in range(10)]
    pq.write_table(pa.table({"image": images, "label": list(range(10))}), src / "data.parquet")
    with pytest.raises(InputError, match=r"'label'.*int64.*--image-column image"):
        run(_config(src, out, image_column="label"))
    assert not list(out.glob("*.parquet")) and not (out / "_runs").exists()
    summary = run(_config(src, out, image_column="image"))
    assert summary.processed == 10 and summary.errors == 0


def test_repeated_key_column_values_are_refused(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.sources import InputError

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    pq.write_table(pa.table({"image": [b"x", b"y"], "id": ["a", "b"]}), src / "one.parquet")
    pq.write_table(pa.table({"image": [b"z"], "id": ["a"]}), src / "two.parquet")
    cfg = _config(src, out, key_column="id")
    with pytest.raises(InputError, match="'a'"):
        run(cfg)
    assert not list(out.glob("*.parquet"))
