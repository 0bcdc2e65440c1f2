"""Reliability: awkward and broken inputs, damaged containers, transient S3 faults, no leaked credentials,
nothing written outside --output. Every test runs the whole job (real local Ray, real S3 endpoint) and
checks the output row by row: every input yields exactly one row, good inputs succeed, bad ones become
error rows that say what failed and where.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zlib
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import JobConfig
from pipeline.run import run
from pipeline.sample import encode, photo_like
from pipeline.storage import resolve_uri
from tests.conftest import TEST_AWS_ENV
from tests.ray_head import RayHead
from tests.s3_proxy import FAULTS, FaultProxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
SMALL = {"model": "vit_ti_16", "weights": "random", "image_size": 32, "batch_size": 16}
SECRET = TEST_AWS_ENV["AWS_SECRET_ACCESS_KEY"]
ERROR_PREFIXES = ("decode: ", "read: ")


# --------------------------------------------------------------------------------------------------------
# Inputs


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def awkward_images() -> dict[str, bytes]:
    """Decodable images that are easy to get wrong: each must give a successful row."""
    rng = np.random.default_rng(0)
    base = photo_like(rng, 40, 30)
    frames = [photo_like(rng, 24, 20) for _ in range(3)]
    rotated = Image.Exif()
    rotated[0x0112] = 6  # Orientation: rotate 90° CW to display
    out: dict[str, bytes] = {
        "cmyk.jpg": encode(base.convert("CMYK")),
        "grayscale.jpg": encode(base.convert("L")),
        "progressive.jpg": encode(base, progressive=True),
        "exif_rotated.jpg": encode(base, exif=rotated.tobytes()),
        "rgba.png": encode(base.convert("RGBA"), "PNG"),
        "la.png": encode(base.convert("LA"), "PNG"),
        "palette_transparent.png": encode(
            base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG", transparency=0
        ),
        "sixteen_bit.png": encode(
            Image.fromarray(np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)), "PNG"
        ),
        "one_bit.png": encode(base.convert("1"), "PNG"),
        "still.webp": encode(base, "WEBP"),
        "image.tiff": encode(base, "TIFF"),
        "image.bmp": encode(base, "BMP"),
        "one_pixel.png": encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
        "strip_3000x6.png": encode(photo_like(rng, 3000, 6), "PNG"),
        "UPPER.JPG": encode(base),
        "no_extension": encode(base),
        "name with spaces.jpg": encode(base),
        "nested/a/b/deep.png": encode(base, "PNG"),
    }
    for fmt, name in (("GIF", "animated.gif"), ("WEBP", "animated.webp")):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
        out[name] = buf.getvalue()
    assert Image.open(io.BytesIO(out["animated.webp"])).n_frames == 3
    return out


def broken_images() -> dict[str, tuple[bytes, str]]:
    """Undecodable inputs → (bytes, a word the error must contain so a person knows what to do)."""
    rng = np.random.default_rng(1)
    jpg = encode(photo_like(rng, 64, 64))
    png = encode(photo_like(rng, 40, 30), "PNG")
    return {
        "empty.jpg": (b"", "empty"),
        "random_bytes.jpg": (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not a recognised"),
        "page.jpg": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", "not a recognised"),
        "truncated_header.png": (png[:20], "truncated"),
        "truncated_header.jpg": (jpg[:12], "truncated"),
        # Decided: a JPEG cut inside its pixel data is an error (a half-grey image would give a plausible
        # but wrong embedding); only a missing final end-of-image marker is tolerated (pipeline/decode.py).
        "partly_truncated.jpg": (jpg[: len(jpg) // 2], "truncated"),
        # 9 Mpx of one colour compresses to 33 kB: refused from the header (max_pixels=1_000_000 below).
        "bomb.png": (encode(Image.new("RGB", (3000, 3000), (0, 128, 0)), "PNG"), "max_pixels"),
    }


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


# --------------------------------------------------------------------------------------------------------
# Output checks


def _read_output(uri: str) -> pa.Table:
    fs, root = resolve_uri(uri)
    return pads.dataset(root, filesystem=fs, format="parquet").to_table()


def _rows(uri: str) -> dict[str, dict]:
    """key → row; fails on a key written twice."""
    table = _read_output(uri)
    rows = table.to_pylist()
    counts = Counter(r["key"] for r in rows)
    duplicated = {k: n for k, n in counts.items() if n > 1}
    assert not duplicated, f"keys written more than once: {duplicated}"
    return {r["key"]: r for r in rows}


def _assert_ok(key: str, row: dict) -> None:
    assert row["error"] is None, f"{key}: expected success, got {row['error']!r}"
    emb = np.asarray(row["embedding"], dtype=np.float32)
    assert emb.shape == (192,), key
    assert np.isfinite(emb).all() and np.abs(emb).sum() > 0, f"{key}: embedding not finite or all zero"
    logits = np.asarray(row["logits"], dtype=np.float32)
    assert logits.shape == (1000,) and np.isfinite(logits).all(), key


def _assert_error(key: str, row: dict, must_contain: str = "") -> str:
    err = row["error"]
    assert err is not None, f"{key}: expected an error row, got a success"
    assert row["embedding"] is None and row["logits"] is None, f"{key}: error row with an embedding"
    _assert_sentence(key, err)
    assert must_contain.lower() in err.lower(), f"{key}: {err!r} does not mention {must_contain!r}"
    return err


def _assert_sentence(key: str, err: str) -> None:
    """`<stage>: <reason>`, one printable line a person can read: no traceback, no repr soup."""
    assert err.startswith(ERROR_PREFIXES), f"{key}: {err!r} does not name its stage"
    assert "\n" not in err and "Traceback" not in err, f"{key}: {err!r}"
    assert err.isprintable() and 20 <= len(err) <= 500, f"{key}: {err!r}"
    reason = err.split(": ", 1)[1]
    assert len(re.findall(r"[A-Za-z]{3,}", reason)) >= 3, f"{key}: {err!r} is not a sentence"


def _check_summary(summary, rows: dict[str, dict]) -> None:
    errors = sum(r["error"] is not None for r in rows.values())
    assert summary.processed == len(rows)
    assert summary.errors == errors
    assert summary.error_rate == pytest.approx(errors / len(rows), abs=1e-6)


# --------------------------------------------------------------------------------------------------------
# Awkward and broken loose files


@pytest.mark.timeout(240)
def test_awkward_and_broken_files_row_by_row(tmp_path: Path, ray_local: None):
    good, bad = awkward_images(), broken_images()
    src, out = tmp_path / "in", tmp_path / "out"
    _write_tree(src, {**good, **{k: v for k, (v, _) in bad.items()}})

    summary = run(
        JobConfig(input=str(src), output=str(out), max_pixels=1_000_000, max_error_rate=1.0, **SMALL)
    )

    rows = _rows(str(out))
    assert set(rows) == set(good) | set(bad), (
        "every object yields exactly one row, keyed by its relative path"
    )
    for key in good:
        _assert_ok(key, rows[key])
    for key, (_, must_contain) in bad.items():
        err = _assert_error(key, rows[key], must_contain)
        assert err.startswith("decode: "), f"{key}: {err!r}"
    _check_summary(summary, rows)
    assert summary.errors == len(bad) and summary.skipped == 0

    # Identical bytes under awkward names give the same embedding (the name plays no part).
    same = [np.asarray(rows[k]["embedding"]) for k in ("UPPER.JPG", "no_extension", "name with spaces.jpg")]
    np.testing.assert_allclose(same[0], same[1], atol=1e-4)
    np.testing.assert_allclose(same[0], same[2], atol=1e-4)


_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
_RUN_EPS = """
import sys
from pipeline.decode import to_patches
try:
    to_patches(open(sys.argv[1], "rb").read(), 32, 16)
    print("decoded")
except Exception as e:
    print(f"refused: {type(e).__name__}: {e}")
"""


def test_decode_never_runs_external_programs(tmp_path: Path):
    """An input file must never make the job run another program: Pillow hands EPS to Ghostscript.

    A fake `gs` on PATH records its calls; decoding an EPS file (bytes anyone can put in a bucket) must
    refuse it as an unsupported format instead of calling it.
    """
    bin_dir, calls = tmp_path / "bin", tmp_path / "gs-calls.txt"
    bin_dir.mkdir()
    fake_gs = bin_dir / "gs"
    fake_gs.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 0\n')
    fake_gs.chmod(0o755)
    (tmp_path / "drawing.eps").write_bytes(_EPS)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_EPS, str(tmp_path / "drawing.eps")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("refused: DecodeError"), proc.stdout
    ran = calls.read_text().splitlines() if calls.exists() else []
    assert not ran, f"decoding an input ran Ghostscript: gs {ran}"


# --------------------------------------------------------------------------------------------------------
# Damaged containers


@pytest.mark.timeout(240)
def test_damaged_tar_shards(tmp_path: Path, ray_local: None):
    rng = np.random.default_rng(2)
    imgs = [encode(photo_like(rng, 40, 30)) for _ in range(5)]
    members = [m for i in range(5) for m in ((f"s{i}.json", b'{"i": %d}' % i), (f"s{i}.jpg", imgs[i]))]
    full = _tar(members)
    with tarfile.open(fileobj=io.BytesIO(full)) as tf:
        where = {m.name: (m.offset, m.offset_data) for m in tf.getmembers()}
    s2_header, s2_data = where["s2.jpg"]
    src, out = tmp_path / "in", tmp_path / "out"
    _write_tree(
        src,
        {
            "good.tar": _tar([*members[:4], ("s9.jpg", b"<html>saved error page</html>")]),
            "cut_in_data.tar": full[: s2_data + 100],  # the archive ends inside s2.jpg
            "cut_in_header.tar": full[: s2_header + 100],  # ... inside s2.jpg's header
            "bad_header.tar": full[:s2_header] + b"\x07" * 512 + full[s2_header + 512 :],
            "not_a_tar.tar": b"hello, I am a text file\n" * 40,
            "empty.tar": b"",
        },
    )

    summary = run(JobConfig(input=str(src), output=str(out), max_error_rate=1.0, **SMALL))

    rows = _rows(str(out))
    ok = {
        "good.tar#s0",
        "good.tar#s1",
        "cut_in_data.tar#s0",
        "cut_in_data.tar#s1",
        "cut_in_header.tar#s0",
        "cut_in_header.tar#s1",
        "bad_header.tar#s0",
        "bad_header.tar#s1",
        "bad_header.tar#s3",  # after the damaged header block, reading resynchronises
        "bad_header.tar#s4",
    }
    errors = {
        "good.tar#s9": "decode: ",  # a sample whose image is not one
        "cut_in_data.tar#s2": "truncated",
        "cut_in_data.tar#.error": "damaged",
        "cut_in_header.tar#s2": "no image member",
        "cut_in_header.tar#.error": "cut inside a header",
        "bad_header.tar#s2": "no image member",
        "bad_header.tar#.error": "unreadable 512-byte header",
        "not_a_tar.tar#.error": "tar",
        "empty.tar#.error": "tar",
    }
    assert set(rows) == ok | set(errors)
    for key in ok:
        _assert_ok(key, rows[key])
    for key, must_contain in errors.items():
        err = _assert_error(key, rows[key], must_contain)
        assert err.startswith("decode: " if key == "good.tar#s9" else "read: "), f"{key}: {err!r}"
    _check_summary(summary, rows)


@pytest.mark.timeout(240)
def test_parquet_null_and_bad_bytes(tmp_path: Path, ray_local: None):
    rng = np.random.default_rng(3)
    imgs = [encode(photo_like(rng, 40, 30), fmt) for fmt in ("JPEG", "PNG", "WEBP")]
    values = [imgs[0], None, b"definitely not an image", imgs[1], b"", imgs[2]]
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    pq.write_table(pa.table({"image": pa.array(values, pa.binary())}), src / "part.parquet", row_group_size=2)
    good = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array(imgs, pa.binary())}), good)
    (src / "cut.parquet").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])  # footer lost

    summary = run(JobConfig(input=str(src), output=str(out), max_error_rate=1.0, **SMALL))

    rows = _rows(str(out))
    assert set(rows) == {f"part.parquet#{i}" for i in range(6)} | {"cut.parquet#.error"}
    for i in (0, 3, 5):
        _assert_ok(f"part.parquet#{i}", rows[f"part.parquet#{i}"])
    assert _assert_error("part.parquet#1", rows["part.parquet#1"], "null").startswith("read: ")
    assert _assert_error("part.parquet#2", rows["part.parquet#2"], "not a recognised").startswith("decode: ")
    assert _assert_error("part.parquet#4", rows["part.parquet#4"], "empty").startswith("decode: ")
    assert _assert_error("cut.parquet#.error", rows["cut.parquet#.error"], "parquet").startswith("read: ")
    _check_summary(summary, rows)


# --------------------------------------------------------------------------------------------------------
# Nothing written outside --output (local): tar member names are never used as paths


def _tree(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every path under root (but not under skip) → (size, mtime): a before/after snapshot."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in filenames + dirnames:
            st = Path(dirpath, name).lstat()
            snap[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return snap


def _cwd() -> str:
    return os.getcwd()


@pytest.mark.timeout(240)
def test_tar_member_names_are_never_paths(tmp_path: Path, ray_local: None):
    import ray

    tag = uuid.uuid4().hex[:10]
    img = encode(photo_like(np.random.default_rng(6), 40, 30))
    absolute_dir = Path(tempfile.gettempdir()) / f"abs-{tag}"
    evil = [
        f"../../evil-{tag}.jpg",
        f"{absolute_dir}/abs-{tag}.jpg",
        f"/etc/etc-{tag}.jpg",
        f"a/../../../up-{tag}.jpg",
        "./fine.jpg",
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name in evil:
            info = tarfile.TarInfo(name)
            info.size = len(img)
            tf.addfile(info, io.BytesIO(img))
        link = tarfile.TarInfo(f"link-{tag}.jpg")  # a symlink member pointing outside
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        side = tarfile.TarInfo(f"link-{tag}.json")
        side.size = 2
        tf.addfile(side, io.BytesIO(b"{}"))
    src, out = tmp_path / "in", tmp_path / "out"
    _write_tree(src, {"evil.tar": buf.getvalue()})
    worker_cwd = Path(ray.get(ray.remote(num_cpus=0)(_cwd).remote()))
    before = _tree(tmp_path.parent, skip=out)

    summary = run(JobConfig(input=str(src), output=str(out), max_error_rate=1.0, **SMALL))

    rows = _rows(str(out))
    keys = {f"evil.tar#{n.removeprefix('./').rsplit('.', 1)[0]}" for n in evil}
    assert set(rows) == keys | {f"evil.tar#link-{tag}"}
    for key in keys:
        _assert_ok(key, rows[key])
    assert _assert_error(f"evil.tar#link-{tag}", rows[f"evil.tar#link-{tag}"], "no image").startswith(
        "read: "
    )
    assert summary.processed == len(keys) + 1

    # No file was created from a member name: not where the names point, not anywhere near the test.
    for path in [absolute_dir, Path(f"/etc/etc-{tag}.jpg")]:
        assert not path.exists(), path
    for root in (tmp_path, src, Path.cwd(), worker_cwd):  # where relative names would land, and above
        for up in (root, root.parent, root.parent.parent):
            hits = [str(p) for p in up.glob(f"*{tag}*")]
            assert not hits, f"a member name became a path: {hits}"
    hits = [str(p) for p in tmp_path.parent.rglob(f"*{tag}*")]
    assert not hits, f"a member name became a path: {hits}"
    after = _tree(tmp_path.parent, skip=out)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    changed -= {str(tmp_path), str(out)}  # tmp_path's mtime changes when the run creates the output dir
    assert not changed, f"written outside --output: {sorted(changed)}"


# --------------------------------------------------------------------------------------------------------
# Transient S3 faults (this test reconnects to Ray and the CLI's starts its own, so they come last)


_VOLATILE = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}|[0-9a-f]{32}")  # run ids and uuids in output paths


_PERMANENT = {"in/vanished.tar": "gone", "in/forbidden.tar": "denied"}  # listed, then never readable


def _choose_fault(method: str, target: str, attempt: int) -> str | None:
    """Which requests fail, and how: decided from the request itself, so the same ones every time.

    Only first tries fail (a client that retries finishes): every read of an input object, every request
    on a Parquet file of the output (staging, moving into place, clean-up), and one in four of the rest
    (listings, run records), whose ids and uuids are masked so that the choice does not change between
    runs. A response is only cut short on a GET; a write is refused before it reaches the store.
    """
    path = _VOLATILE.sub("X", unquote(target.split(" ", 1)[0].split("?", 1)[0].split("/", 2)[-1]))
    if method in ("GET", "HEAD") and path in _PERMANENT:
        return _PERMANENT[path]  # every try
    if attempt > 0:
        return None
    h = zlib.crc32(f"{method} {path}".encode())
    fault = FAULTS[h % len(FAULTS)]
    if fault == "truncate" and method != "GET":
        fault = "reset"
    chosen = (method == "GET" and path.startswith("in/")) or path.endswith(".parquet") or (h // 5) % 4 == 0
    return fault if chosen else None


def _names_for(faults: list[str], pattern: str) -> list[str]:
    """Object names whose first GET gets each of `faults` (so every kind hits the workers' reads)."""
    names, i = [], 0
    for fault in faults:
        while _choose_fault("GET", "/bucket/" + (name := pattern.format(i)), 0) != fault:
            i += 1
        names.append(name)
        i += 1
    return names


@pytest.fixture()
def ray_reconnected(ray_cluster: RayHead, monkeypatch: pytest.MonkeyPatch):
    """Disconnects this process from the session's Ray so that `run()` connects to it again as a job does
    on a cluster (RAY_ADDRESS), forwarding this test's S3 endpoint to its workers."""
    import ray

    ray.shutdown()
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.gcs_address)
    yield
    ray.shutdown()  # the next `ray_local` user connects again, without this test's environment


@pytest.mark.timeout(300)
def test_transient_s3_faults_are_retried(
    s3_server: str, s3_bucket: str, ray_reconnected: None, monkeypatch: pytest.MonkeyPatch
):
    """Input from S3 and output to S3 through the proxy: the first try of every request fails.

    One run (each run costs an actor start): webdataset shards, streamed by the workers, one shard per
    kind of fault on its first read; the driver's listing and the output's writes fail once too. Two more
    shards are listed but can never be read (deleted meanwhile; access denied): one error row each.
    """
    s3 = boto3.client("s3", endpoint_url=s3_server)
    rng = np.random.default_rng(4)
    tars = {
        name: [(f"{name[-6:-4]}/{i}.jpg", encode(photo_like(rng, 40, 30))) for i in range(3)]
        for name in _names_for(list(FAULTS), "in/shard-{:02d}.tar")
    }
    for name, members in tars.items():
        s3.put_object(Bucket=s3_bucket, Key=name, Body=_tar(members))
    for name in _PERMANENT:
        s3.put_object(Bucket=s3_bucket, Key=name, Body=_tar([("x.jpg", b"never read")]))

    proxy = FaultProxy(s3_server, _choose_fault).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # the driver, and (forwarded) every worker
        summary = run(
            JobConfig(
                input=f"s3://{s3_bucket}/in", output=f"s3://{s3_bucket}/out", max_error_rate=1.0, **SMALL
            )
        )
    finally:
        proxy.stop()
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)

    # Every row exactly once; no error row but the two unreadable shards'.
    rows = _rows(f"s3://{s3_bucket}/out")
    expected = {f"{n.removeprefix('in/')}#{m[:-4]}" for n, ms in tars.items() for m, _ in ms}
    unreadable = {"vanished.tar#.error": "NoSuchKey|not exist|not found", "forbidden.tar#.error": "denied"}
    assert set(rows) == expected | set(unreadable), (
        f"lost: {expected - set(rows)}, extra: {set(rows) - expected}"
    )
    for key in expected:
        _assert_ok(key, rows[key])
    for key, reason in unreadable.items():
        err = _assert_error(key, rows[key])
        assert err.startswith("read: ") and re.search(reason, err, re.I), f"{key}: {err!r}"
    assert (summary.processed, summary.errors) == (len(rows), len(unreadable))

    # The faults happened: every kind, on the first read of every shard (in the workers), and on writes.
    log = list(proxy.log)

    def faulted(methods: tuple[str, ...]) -> set[str]:
        return {
            unquote(t.split(" ", 1)[0].split("?", 1)[0].split("/", 2)[-1])
            for m, t, f in log
            if f and m in methods
        }

    missed = (set(tars) - faulted(("GET",))) | (set(_PERMANENT) - faulted(("GET", "HEAD")))
    assert not missed, f"shards whose first read met no fault: {missed}"
    assert all(proxy.injected[f] >= 1 for f in FAULTS), dict(proxy.injected)
    assert any(f for m, t, f in log if m in ("PUT", "POST") and "/out/" in t), "no write met a fault"
    print(f"\ninjected {proxy.total_injected} faults {dict(proxy.injected)} into {len(log)} requests")


# --------------------------------------------------------------------------------------------------------
# Credentials never leak; nothing written outside --output (S3). One CLI run, several checks.


def _bucket_snapshot(s3) -> dict[tuple[str, str], str]:
    snap = {}
    for bucket in s3.list_buckets()["Buckets"]:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
            for obj in page.get("Contents", []):
                snap[(bucket["Name"], obj["Key"])] = obj["ETag"]
    return snap


@pytest.fixture(scope="module")
def cli_run(s3_server: str, tmp_path_factory: pytest.TempPathFactory):
    """`jobs/embed.py` from s3:// to s3:// with a few broken objects, as a user runs it (own local Ray)."""
    import ray

    ray.shutdown()  # the CLI starts its own Ray: give it the CPUs
    s3 = boto3.client("s3", endpoint_url=s3_server)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    rng = np.random.default_rng(5)
    inputs = {f"in/ok{i}.jpg": encode(photo_like(rng, 40, 30)) for i in range(4)}
    inputs |= {"in/empty.jpg": b"", "in/page.jpg": b"<html>AccessDenied</html>", "in/cut.png": b"\x89PNG\r\n"}
    for key, body in inputs.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    s3.put_object(Bucket=bucket, Key="elsewhere/keep.txt", Body=b"untouched")
    before = _bucket_snapshot(s3)

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    assert env["AWS_SECRET_ACCESS_KEY"] == SECRET
    output = f"s3://{bucket}/out/emb"
    cli = [
        sys.executable,
        str(REPO / "jobs" / "embed.py"),
        "--input",
        f"s3://{bucket}/in",
        "--output",
        output,
    ]
    cli += ["--model", "vit_ti_16", "--weights", "random", "--image-size", "32", "--max-error-rate", "0.9"]
    cli += ["--verbose"]
    try:
        cwd = tmp_path_factory.mktemp("cli")
        proc = subprocess.run(cli, capture_output=True, text=True, timeout=240, cwd=cwd, env=env)
        yield {
            "proc": proc,
            "inputs": inputs,
            "output": output,
            "bucket": bucket,
            "ray_tmp": Path(ray_tmp),
            "before": before,
            "after": _bucket_snapshot(s3),
        }
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.timeout(300)
def test_cli_outputs_hold_no_secret(cli_run: dict):
    proc = cli_run["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The summary JSON and everything the CLI printed (with --verbose, and Ray's worker logs).
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["processed"] == len(cli_run["inputs"]) and summary["errors"] == 3
    assert SECRET not in json.dumps(summary)
    assert SECRET not in proc.stdout and SECRET not in proc.stderr

    # The error column, the Parquet footers and every byte under the output, the _runs/ ledger included.
    rows = _rows(cli_run["output"])
    assert set(rows) == {k.removeprefix("in/") for k in cli_run["inputs"]}
    for key in ("empty.jpg", "page.jpg", "cut.png"):
        assert SECRET not in _assert_error(key, rows[key])
    fs, root = resolve_uri(cli_run["output"])
    selector = pafs.FileSelector(root, recursive=True)
    written = [i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]
    assert any("/_runs/" in p for p in written) and any(
        p.endswith(".parquet") and "/_" not in p for p in written
    )
    for path in written:
        with fs.open_input_stream(path) as f:
            assert SECRET.encode() not in f.read(), f"the secret is in {path}"
        if path.endswith(".parquet") and "/_" not in path:
            meta = pq.read_schema(path, filesystem=fs).metadata or {}
            assert meta and all(SECRET.encode() not in k + v for k, v in meta.items())


@pytest.mark.timeout(300)
def test_cli_ray_logs_hold_no_secret(cli_run: dict):
    """Ray's own session files (logs of every process the job started) must not hold the secret either."""
    assert cli_run["proc"].returncode == 0, cli_run["proc"].stderr[-3000:]
    leaks = []
    for path in cli_run["ray_tmp"].rglob("*"):
        try:
            if path.is_file() and SECRET.encode() in path.read_bytes():
                leaks.append(str(path.relative_to(cli_run["ray_tmp"])))
        except OSError:
            pass
    assert not leaks, f"the secret is in Ray's session files: {leaks[:10]}"


@pytest.mark.timeout(300)
def test_cli_writes_only_under_output(cli_run: dict):
    assert cli_run["proc"].returncode == 0, cli_run["proc"].stderr[-3000:]
    before, after = cli_run["before"], cli_run["after"]
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    outside = {k for k in changed if not (k[0] == cli_run["bucket"] and k[1].startswith("out/emb/"))}
    assert not outside, f"written outside --output: {sorted(outside)}"
    assert any(k[1].endswith(".parquet") for k in changed), "the run wrote no data file"
