"""Input manifests (--input-list): Parquet, CSV and S3 Inventory reports name the objects to read."""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path
from urllib.parse import quote_plus

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import pipeline.sources.manifest as manifest
from pipeline.config import ConfigError, JobConfig
from pipeline.sample import encode, photo_like
from pipeline.sources import InputError, ReadShards, Shard, list_manifest, list_shards, manifest_pages
from tests.conftest import create_bucket

# Keys that URL-encoding, URI parsing or a literal-key filesystem could get wrong.
ODD_NAMES = ["a b.jpg", "100%.jpg", "x#1.jpg", "q?.jpg", "a+b.jpg", "ünï/çødé 1.jpg", "plain/img.jpg"]
INVENTORY_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag"


def _jpeg(seed: int = 0) -> bytes:
    return encode(photo_like(np.random.default_rng(seed), 40, 30))


def _parquet_manifest(where: Path, /, **columns: list) -> str:
    pq.write_table(pa.table(columns), where)
    return str(where)


def _csv_manifest(path: Path, header: list[str], rows: list[list[object]]) -> str:
    lines = [",".join(header)] + [",".join(f'"{v}"' for v in row) for row in rows]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return str(path)


def _images(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_jpeg(i))


# --------------------------------------------------------------------------------------------------------
# Local inputs, Parquet and CSV manifests


def test_parquet_manifest_gives_the_shards_listing_gives(tmp_path: Path):
    src = tmp_path / "in"
    _images(src, ["a.jpg", "sub/b.png", "sub/c.jpg", "_skip/d.jpg", ".e.jpg", "sub/.f.jpg"])
    listed = list_shards(str(src))
    names = ["sub/c.jpg", "a.jpg", "sub/b.png", "a.jpg", "_skip/d.jpg", ".e.jpg", "sub/.f.jpg", "sub/"]
    sizes = {s.rel: s.size for s in listed}
    uri = _parquet_manifest(
        tmp_path / "m.parquet", key=names, size=[sizes.get(n, 0) for n in names], other=list(range(8))
    )
    # Duplicates read once, hidden names and folder markers skipped, sorted by rel: what listing gives.
    assert list_manifest(str(src), uri) == listed
    assert [s.rel for s in listed] == ["a.jpg", "sub/b.png", "sub/c.jpg"]
    # Without a size column the sizes are 0 (the read stage reads the object whole).
    bare = _parquet_manifest(tmp_path / "bare.parquet", key=["sub/c.jpg"])
    assert list_manifest(str(src), bare) == [Shard(str(src / "sub" / "c.jpg"), "sub/c.jpg", "file", 0)]


def test_csv_manifest_with_a_header_row_keys_literal(tmp_path: Path, s3_server: str):
    # Column names in any case; keys of a CSV manifest are literal ('+' and '%20' are key characters).
    uri = _csv_manifest(
        tmp_path / "m.csv",
        ["Bucket", "KEY", "size", "note"],
        [
            ["photos", "2026/a+b%20c.jpg", 10, "x"],
            ["photos", "2026/0001.jpg", "", "y"],
            ["photos", "2026/sub/d,e.jpg", 7, "z"],
        ],
    )
    shards = list_manifest("s3://photos/2026/", uri)
    assert shards == [
        Shard("photos/2026/0001.jpg", "0001.jpg", "file", 0),
        Shard("photos/2026/a+b%20c.jpg", "a+b%20c.jpg", "file", 10),
        Shard("photos/2026/sub/d,e.jpg", "sub/d,e.jpg", "file", 7),
    ]
    gz = _csv_manifest(tmp_path / "m.csv.gz", ["key"], [["2026/x.jpg"]])
    assert [s.rel for s in list_manifest("s3://photos/2026", gz)] == ["x.jpg"]
    # A whole bucket as --input: rel is the key.
    assert [s.path for s in list_manifest("s3://photos", gz)] == ["photos/2026/x.jpg"]


def test_manifest_pages_come_one_record_batch_at_a_time(tmp_path: Path, monkeypatch):
    src = tmp_path / "in"
    names = [f"i{i}.jpg" for i in range(5)]
    uri = _parquet_manifest(tmp_path / "m.parquet", key=names)
    monkeypatch.setattr(manifest, "PAGE_ROWS", 2)
    pages = list(manifest_pages(str(src), uri))
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [rel for page in pages for _, rel, _ in page] == names
    assert pages[0][0] == (str(src / "i0.jpg"), "i0.jpg", 0)


def test_formats_and_mixed_inputs_as_listing(tmp_path: Path):
    src = tmp_path / "in"
    _images(src, ["a.jpg", "b.tar", "c.parquet"])
    uri = _parquet_manifest(tmp_path / "m.parquet", key=["a.jpg", "b.tar", "c.parquet"])
    with pytest.raises(InputError) as listed_error:
        list_shards(str(src))
    with pytest.raises(InputError) as manifest_error:
        list_manifest(str(src), uri, "auto")
    assert str(manifest_error.value) == str(listed_error.value)
    assert "mixes 1 .tar, 1 .parquet and 1 other files" in str(manifest_error.value)
    assert [(s.rel, s.kind) for s in list_manifest(str(src), uri, "webdataset")] == [("b.tar", "webdataset")]
    assert {s.kind for s in list_manifest(str(src), uri, "files")} == {"file"}
    only_jpg = _parquet_manifest(tmp_path / "j.parquet", key=["a.jpg"])
    with pytest.raises(InputError, match=r"has no \.parquet files, which --format parquet reads"):
        list_manifest(str(src), only_jpg, "parquet")


# --------------------------------------------------------------------------------------------------------
# Refusals


def test_refusals_say_what_and_how_many(tmp_path: Path, s3_server: str):
    m = tmp_path / "m.parquet"
    uri = _parquet_manifest(
        m, bucket=["photos", "other", "other"], key=["2026/a.jpg", "2026/b.jpg", "2026/c.jpg"]
    )
    with pytest.raises(InputError, match=r"names 2 objects in another bucket than --input's \(photos\)"):
        list_manifest("s3://photos/2026", uri)
    with pytest.raises(InputError, match=r"e\.g\. s3://other/2026/b\.jpg"):
        list_manifest("s3://photos/2026", uri)

    uri = _parquet_manifest(m, key=["2026/a.jpg", "2025/b.jpg", "20261/c.jpg", "2026"])
    with pytest.raises(InputError, match=r"names 3 objects outside --input s3://photos/2026.*'2025/b\.jpg'"):
        list_manifest("s3://photos/2026", uri)
    with pytest.raises(InputError, match=r"keys must start with '2026/'"):
        list_manifest("s3://photos/2026/", uri)

    uri = _parquet_manifest(m, key=["ok.jpg", "../secret.jpg", "/etc/passwd", "a/./b.jpg"])
    with pytest.raises(InputError, match=r"names 3 objects outside --input .*'\.\./secret\.jpg'"):
        list_manifest(str(tmp_path / "in"), uri)

    uri = _parquet_manifest(m, path=["a.jpg"], bytes=[1])
    with pytest.raises(InputError, match=r"has no 'key' column \(its columns: path, bytes\)"):
        list_manifest(str(tmp_path / "in"), uri)
    csv = _csv_manifest(tmp_path / "m.csv", ["name", "size"], [["a.jpg", 1]])
    with pytest.raises(InputError, match=r"has no 'key' column \(its columns: name, size\)"):
        list_manifest(str(tmp_path / "in"), csv)
    uri = _parquet_manifest(m, key=[1, 2])
    with pytest.raises(InputError, match=r"column 'key' is int64, not text"):
        list_manifest(str(tmp_path / "in"), uri)

    pq.write_table(pa.table({"key": pa.array([], pa.string())}), m)
    with pytest.raises(InputError, match=r"names no objects to read"):
        list_manifest(str(tmp_path / "in"), str(m))
    uri = _parquet_manifest(m, key=["_a.jpg", ".b/c.jpg", "d/"])
    with pytest.raises(InputError, match=r"names no objects to read .*'_' or '\.'"):
        list_manifest(str(tmp_path / "in"), uri)

    with pytest.raises(InputError, match=r"Manifest .*nope\.parquet \(--input-list\) does not exist"):
        list_manifest(str(tmp_path / "in"), str(tmp_path / "nope.parquet"))
    (tmp_path / "m.txt").write_text("a.jpg\n")
    with pytest.raises(InputError, match=r"Cannot tell the format of manifest"):
        list_manifest(str(tmp_path / "in"), str(tmp_path / "m.txt"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"Cannot read manifest .*bad\.parquet"):
        list_manifest(str(tmp_path / "in"), str(tmp_path / "bad.parquet"))


def test_config_and_command_line(tmp_path: Path):
    from jobs.embed import config_from_args, parse_args

    args = ["--input", "s3://b/p", "--output", str(tmp_path / "o"), "--weights", "random"]
    config = config_from_args(parse_args([*args, "--input-list", "s3://inv/b/cfg/manifest.json"]))
    assert config.input_list == "s3://inv/b/cfg/manifest.json"
    assert config_from_args(parse_args(args)).input_list is None
    for bad in ("", "  ", "https://example.com/m.csv", "s3:///m.csv"):
        with pytest.raises(ConfigError, match="--input-list must be a local path or an s3://"):
            JobConfig(input="s3://b/p", output=str(tmp_path / "o"), input_list=bad)
    with pytest.raises(ConfigError, match="--input-list must be outside --output"):
        JobConfig(input="s3://b/p", output=str(tmp_path / "o"), input_list=str(tmp_path / "o" / "m.csv"))


# --------------------------------------------------------------------------------------------------------
# S3 Inventory reports


def _inventory_row(bucket: str, key: str, size: int, latest: bool = True, marker: bool = False) -> str:
    fields = [bucket, quote_plus(key, safe="/"), "v1", str(latest).lower(), str(marker).lower()]
    fields += ["" if marker else str(size), "2026-01-01T00:00:00.000Z", "etag"]
    return ",".join(f'"{f}"' for f in fields)


@pytest.mark.integration
def test_s3_inventory_csv_with_url_encoded_keys(s3_server: str, s3_bucket: str):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    objects = {f"photos/{name}": _jpeg(i) for i, name in enumerate(ODD_NAMES)}
    for key, data in objects.items():
        s3.put_object(Bucket=s3_bucket, Key=key, Body=data)
    s3.put_object(Bucket=s3_bucket, Key="photos/_meta/x.json", Body=b"{}")
    dest = f"t-{uuid.uuid4().hex[:12]}"  # the inventory's destination bucket
    create_bucket(s3, dest)

    rows = [_inventory_row(s3_bucket, k, len(v)) for k, v in objects.items()]
    rows += [
        _inventory_row(s3_bucket, "photos/a b.jpg", 1, latest=False),  # an older version
        _inventory_row(s3_bucket, "photos/deleted.jpg", 0, marker=True),  # a delete marker
        _inventory_row(s3_bucket, "photos/_meta/x.json", 2),  # hidden, as listing skips it
        _inventory_row(s3_bucket, "photos/", 0),  # a folder marker
    ]
    half = len(rows) // 2
    base = f"inv/{s3_bucket}/daily"
    files = []
    for i, part in enumerate([rows[:half], rows[half:]]):
        key = f"{base}/data/{uuid.uuid4()}.csv.gz"
        s3.put_object(Bucket=dest, Key=key, Body=gzip.compress(("\n".join(part) + "\n").encode()))
        files.append({"key": key, "size": 1, "MD5checksum": f"{i:032x}"})
    doc = {
        "sourceBucket": s3_bucket,
        "destinationBucket": f"arn:aws:s3:::{dest}",
        "version": "2016-11-30",
        "fileFormat": "CSV",
        "fileSchema": INVENTORY_SCHEMA,
        "files": files,
    }
    s3.put_object(Bucket=dest, Key=f"{base}/2026-01-02T01-00Z/manifest.json", Body=json.dumps(doc).encode())
    manifest_uri = f"s3://{dest}/{base}/2026-01-02T01-00Z/manifest.json"

    input_uri = f"s3://{s3_bucket}/photos"
    shards = list_manifest(input_uri, manifest_uri, "auto")
    # Decoded keys, sizes from the inventory: the very shards listing the bucket gives.
    assert shards == list_shards(input_uri)
    assert sorted(s.rel for s in shards) == sorted(ODD_NAMES)
    # The keys name the objects literally: each reads back as its bytes.
    reader = ReadShards(input_uri, retry_backoff_s=0)
    for shard in shards:
        ((key, data, error),) = list(reader.read_shard(shard))
        assert (key, data, error) == (shard.rel, objects[f"photos/{shard.rel}"], None)

    # An inventory of another bucket is refused before its files are read.
    with pytest.raises(InputError, match=rf"is an inventory of bucket {s3_bucket}, not of --input's bucket"):
        list_manifest(f"s3://{dest}/photos", manifest_uri, "auto")


def test_parquet_inventory_read_from_a_local_copy(tmp_path: Path, s3_server: str):
    """A report copied locally (prefix/bucket/config/ with its date folder and data/) is read where its
    layout puts the data files; Parquet inventories hold keys as they are, not URL-encoded."""
    report = tmp_path / "photos" / "weekly"
    (report / "data").mkdir(parents=True)
    (report / "2026-01-04T01-00Z").mkdir()
    table = pa.table(
        {
            "bucket": ["photos"] * 5,
            "key": ["2026/a+b.jpg", "2026/100%.jpg", "2026/x.jpg", "2026/x.jpg", "2026/gone.jpg"],
            "version_id": ["1", "2", "3", "4", "5"],
            "is_latest": [True, True, True, False, True],
            "is_delete_marker": [False, False, False, False, True],
            "size": pa.array([10, 20, 30, 99, None], pa.int64()),
            "last_modified_date": pa.array([0] * 5, pa.timestamp("ms")),
        }
    )
    pq.write_table(table.slice(0, 2), report / "data" / "part-1.parquet")
    pq.write_table(table.slice(2), report / "data" / "part-2.parquet")
    doc = {
        "sourceBucket": "photos",
        "destinationBucket": "arn:aws:s3:::inventories",
        "fileFormat": "Parquet",
        "fileSchema": "message s3.inventory { required binary bucket (STRING); ... }",
        "files": [{"key": f"inv/photos/weekly/data/part-{i}.parquet", "size": 1} for i in (1, 2)],
    }
    (report / "2026-01-04T01-00Z" / "manifest.json").write_text(json.dumps(doc))
    shards = list_manifest("s3://photos/2026", str(report / "2026-01-04T01-00Z" / "manifest.json"))
    assert [(s.path, s.rel, s.size) for s in shards] == [
        ("photos/2026/100%.jpg", "100%.jpg", 20),
        ("photos/2026/a+b.jpg", "a+b.jpg", 10),
        ("photos/2026/x.jpg", "x.jpg", 30),
    ]

    orc = dict(doc, fileFormat="ORC")
    (report / "orc.json").write_text(json.dumps(orc))
    with pytest.raises(
        InputError, match=r"format is ORC, which is not read here; configure .* CSV or Parquet"
    ):
        list_manifest("s3://photos/2026", str(report / "orc.json"))
    (report / "other.json").write_text(json.dumps({"files": []}))
    with pytest.raises(InputError, match=r"is not an S3 Inventory manifest\.json"):
        list_manifest("s3://photos/2026", str(report / "other.json"))


# --------------------------------------------------------------------------------------------------------
# Reading and running


def test_a_named_object_that_does_not_exist_becomes_an_error_row(tmp_path: Path):
    src = tmp_path / "in"
    _images(src, ["here.jpg"])
    uri = _csv_manifest(tmp_path / "m.csv", ["key", "size"], [["here.jpg", 5], ["gone.jpg", 7]])
    shards = list_manifest(str(src), uri)  # not checked at planning
    assert [s.rel for s in shards] == ["gone.jpg", "here.jpg"]
    rows = [row for shard in shards for row in ReadShards(str(src), retry_backoff_s=0).read_shard(shard)]
    (gone_key, gone_bytes, gone_error), (here_key, here_bytes, here_error) = rows
    assert (gone_key, gone_bytes) == ("gone.jpg", None)
    assert gone_error.startswith("read: FileNotFoundError")
    assert (here_key, here_error) == ("here.jpg", None) and here_bytes == (src / "here.jpg").read_bytes()


def test_dry_run_plans_from_the_manifest(tmp_path: Path, capsys):
    from jobs.embed import main

    src = tmp_path / "in"
    _images(src, ["a.jpg", "b.jpg", "c.jpg"])
    uri = _csv_manifest(tmp_path / "m.csv", ["key"], [["b.jpg"], ["c.jpg"]])
    args = ["--input", str(src), "--output", str(tmp_path / "out"), "--model", "vit_ti_16"]
    args += ["--weights", "random", "--image-size", "32", "--input-list", uri, "--dry-run"]
    assert main(args) == 0
    assert "(2 shards to do: file; 0 already done)" in capsys.readouterr().out
    assert main([*args[:-3], "--input-list", str(tmp_path / "missing.csv"), "--dry-run"]) == 2
    assert "missing.csv (--input-list) does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_scheduled_runs_with_new_manifests_process_only_new_rows(tmp_path: Path, ray_local: None):
    from pipeline.embed import FakeEmbedPatches
    from pipeline.run import run

    src, out = tmp_path / "in", tmp_path / "out"
    first, later = [f"day1/{i}.jpg" for i in range(6)], [f"day2/{i}.jpg" for i in range(3)]
    _images(src, [*first, *later, "unlisted.jpg"])

    def job(names: list[str], name: str):
        uri = _parquet_manifest(tmp_path / name, key=names)
        config = JobConfig(
            input=str(src),
            output=str(out),
            input_list=uri,
            model="vit_ti_16",
            weights="random",
            image_size=32,
            max_error_rate=0.5,
        )
        return run(
            config, embedder=FakeEmbedPatches, embedder_kwargs={"embedding_dim": 192, "num_classes": 1000}
        )

    one = job(first, "day1.parquet")
    assert (one.processed, one.skipped, one.errors) == (6, 0, 0)
    # The next inventory names everything so far plus the new objects (and one that was deleted since).
    two = job([*first, *later, "day2/deleted.jpg"], "day2.parquet")
    assert (two.processed, two.skipped, two.errors) == (4, 6, 1)
    table = pads.dataset(str(out), format="parquet").to_table(columns=["key", "error"])
    errors = dict(zip(table["key"].to_pylist(), table["error"].to_pylist()))
    assert sorted(errors) == sorted([*first, *later, "day2/deleted.jpg"])  # never unlisted.jpg, no repeats
    assert errors["day2/deleted.jpg"].startswith("read: FileNotFoundError")
    assert all(errors[k] is None for k in [*first, *later])


# --------------------------------------------------------------------------------------------------------
# Manifests too large for the driver: read and sorted into buckets by workers


def test_a_large_manifest_is_planned_from_its_first_keys_and_left_to_workers(
    tmp_path: Path, monkeypatch, capsys
):
    from pipeline.discover import STREAM_ABOVE_ENV
    from pipeline.plan import manifest_input

    src = tmp_path / "in"
    (tmp_path / "m").mkdir()
    _parquet_manifest(tmp_path / "m" / "0.parquet", key=[f"a/{i}.jpg" for i in range(8)])
    _parquet_manifest(tmp_path / "m" / "1.parquet", key=[f"b/{i}.jpg" for i in range(8)])
    config = JobConfig(input=str(src), output=str(tmp_path / "out"), input_list=str(tmp_path / "m"))
    monkeypatch.setenv(STREAM_ABOVE_ENV, "5")
    large, shards = manifest_input(config)
    assert large is not None and not shards and len(large.files) == 2 and large.buckets >= 16
    from jobs.embed import main

    args = ["--input", str(src), "--output", str(tmp_path / "out"), "--model", "vit_ti_16", "--weights"]
    assert (
        main([*args, "random", "--image-size", "32", "--input-list", str(tmp_path / "m"), "--dry-run"]) == 0
    )
    assert "(more than 5 files named by --input-list; its 2 data files are read, sorted into" in (
        capsys.readouterr().out
    )
    monkeypatch.setenv(STREAM_ABOVE_ENV, "16")  # all of it fits: read here, as before
    large, shards = manifest_input(config)
    assert large is None and len(shards) == 16
    # What the driver reads of a large manifest is checked as the whole would be.
    monkeypatch.setenv(STREAM_ABOVE_ENV, "5")
    _parquet_manifest(tmp_path / "m" / "0.parquet", key=[f"/abs/{i}.jpg" for i in range(8)])
    with pytest.raises(InputError, match="names 8 objects outside --input"):
        manifest_input(config)
    # A large manifest of tar shards is read on the driver: its shards are few.
    _parquet_manifest(tmp_path / "m" / "0.parquet", key=[f"a/{i}.tar" for i in range(8)])
    _parquet_manifest(tmp_path / "m" / "1.parquet", key=[f"b/{i}.tar" for i in range(8)])
    large, shards = manifest_input(config)
    assert large is None and {s.kind for s in shards} == {"webdataset"} and len(shards) == 16


def test_buckets_hold_each_key_once_sorted_whatever_the_manifest_order(tmp_path: Path):
    from pipeline.discover import ManifestBuckets, SortedKeys, sort_bucket
    from pipeline.sources.manifest import manifest_files
    from pipeline.sources.walk import Walker

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    names = [f"d{i % 7}/{i:04d}.jpg" for i in range(300)]
    (tmp_path / "m").mkdir()
    for j in range(3):  # every key in two files, shuffled, some twice in one file
        keys = [names[i] for i in rng.permutation(300) if i % 3 != j] + names[j : j + 5]
        _parquet_manifest(tmp_path / "m" / f"{j}.parquet", key=keys, size=[len(k) for k in keys])
    files = manifest_files(str(src), str(tmp_path / "m"))
    stage = ManifestBuckets(str(src), str(tmp_path / "m"), buckets=4)
    tables = [t for f in files for t in stage({"file": np.array([f], dtype=object)})]
    rows = pa.concat_tables(tables)
    assert rows.num_rows == 3 * 200 + 15
    scratch = str(tmp_path / "scratch")
    parts = []
    for b in range(4):  # what map_groups hands SortBucket: all rows of one bucket, in any order
        group = rows.filter(pa.compute.equal(rows["bucket"], b))
        group = group.take(pa.array(rng.permutation(group.num_rows)))
        out = sort_bucket(group, scratch).to_pylist()[0]
        parts.append(SortedKeys(out["bucket"], out["uri"], out["keys"]))
        assert sort_bucket(group, scratch).to_pylist()[0] == out  # a retried task writes the same file
    walker = Walker(str(src))
    pages = [[e for page in p.pages(walker, size=16) for e in page] for p in parts]
    assert sorted(rel for page in pages for _, rel, _ in page) == sorted(names)
    for page in pages:
        rels = [rel for _, rel, _ in page]
        assert rels == sorted(rels) and len(rels) == len(set(rels))
        assert all(path == str(src / rel) and size == len(rel) for path, rel, size in page)


@pytest.mark.integration
@pytest.mark.slow
def test_runs_from_a_large_manifest_write_every_key_once(tmp_path: Path, ray_local: None, monkeypatch):
    from pipeline.discover import STREAM_ABOVE_ENV
    from pipeline.embed import FakeEmbedPatches
    from pipeline.run import run

    monkeypatch.setenv(STREAM_ABOVE_ENV, "4")
    src, out = tmp_path / "in", tmp_path / "out"
    day1 = [f"p{i % 3}/{i:03d}.jpg" for i in range(24)]
    day2 = [f"p{i % 3}/new-{i:03d}.jpg" for i in range(6)]
    _images(src, [*day1, *day2])
    (src / "p0" / "bad.jpg").write_bytes(b"not an image")

    def job(manifest: Path, **kw):
        config = JobConfig(
            input=str(src),
            output=str(out),
            input_list=str(manifest),
            model="vit_ti_16",
            weights="random",
            image_size=32,
            max_error_rate=0.5,
            commit_interval_s=0,
            **kw,
        )
        return run(
            config, embedder=FakeEmbedPatches, embedder_kwargs={"embedding_dim": 192, "num_classes": 1000}
        )

    m1 = tmp_path / "m1"
    m1.mkdir()
    _parquet_manifest(m1 / "0.parquet", key=[*day1[:16], "p0/bad.jpg", day1[3]])
    _parquet_manifest(m1 / "1.parquet", key=[*day1[10:], day1[0]])  # day1[10:16] and day1[0] in both files
    one = job(m1)
    assert (one.processed, one.errors, one.skipped) == (25, 1, 0), one
    assert one.startup.get("manifest", 0) > 0
    assert not (out / "_staging").exists(), "the sorted buckets are removed with the run's staging"

    # The next day's inventory: everything so far, the new objects, and the bad one, fixed and retried.
    (src / "p0" / "bad.jpg").write_bytes(_jpeg(99))
    m2 = tmp_path / "m2"
    m2.mkdir()
    _parquet_manifest(m2 / "0.parquet", key=[*day2, *day1[:12]])
    _parquet_manifest(m2 / "1.parquet", key=[*day1[12:], "p0/bad.jpg", *day2[:2]])
    two = job(m2, retry_errors=True)
    assert (two.processed, two.retried, two.skipped_shards) == (7, 1, 25), two  # 6 new, 1 retried
    table = pads.dataset(str(out), format="parquet").to_table(columns=["key", "error"])
    keys = table["key"].to_pylist()
    assert len(keys) == len(set(keys)), "no key twice"
    assert set(keys) == {*day1, *day2, "p0/bad.jpg"} and table["error"].null_count == table.num_rows


@pytest.mark.integration
@pytest.mark.slow
def test_a_key_outside_the_input_found_by_a_worker_stops_the_run_before_anything_is_written(
    tmp_path: Path, ray_local: None, monkeypatch
):
    from pipeline.discover import STREAM_ABOVE_ENV
    from pipeline.embed import FakeEmbedPatches
    from pipeline.run import run

    monkeypatch.setenv(STREAM_ABOVE_ENV, "4")
    src, out = tmp_path / "in", tmp_path / "out"
    _images(src, [f"{i}.jpg" for i in range(8)])
    (tmp_path / "m").mkdir()
    _parquet_manifest(tmp_path / "m" / "0.parquet", key=[f"{i}.jpg" for i in range(8)])
    _parquet_manifest(tmp_path / "m" / "1.parquet", key=["ok.jpg", "../escape.jpg"])
    config = JobConfig(
        input=str(src),
        output=str(out),
        input_list=str(tmp_path / "m"),
        model="vit_ti_16",
        weights="random",
        image_size=32,
    )
    # A worker counts what its data file names, and says which file that is.
    with pytest.raises(
        InputError, match=r"\(in [^)]*1\.parquet\) names 1 object outside --input .*'\.\./escape"
    ):
        run(config, embedder=FakeEmbedPatches, embedder_kwargs={"embedding_dim": 192, "num_classes": 1000})
    assert not list(out.glob("part-*")) and not list(out.glob("_runs/*/commit-*.json"))


@pytest.mark.integration
@pytest.mark.slow
def test_a_large_manifest_on_s3_into_an_s3_output(
    s3_server: str, s3_bucket: str, ray_local: None, monkeypatch
):
    from pipeline.discover import STREAM_ABOVE_ENV
    from pipeline.embed import FakeEmbedPatches
    from pipeline.run import run

    monkeypatch.setenv(STREAM_ABOVE_ENV, "4")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    names = [f"p{i % 3}/{i:02d} #{i}.jpg" for i in range(10)]
    for i, name in enumerate(names):
        s3.put_object(Bucket=s3_bucket, Key=f"in/{name}", Body=_jpeg(i))
    for j, keys in enumerate([names[:7], names[5:]]):  # names[5:7] in both files
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table({"key": [f"in/{n}" for n in keys]}), buf)
        s3.put_object(Bucket=s3_bucket, Key=f"manifest/{j}.parquet", Body=buf.getvalue().to_pybytes())
    out = f"s3://{s3_bucket}/out"
    config = JobConfig(
        input=f"s3://{s3_bucket}/in",
        output=out,
        input_list=f"s3://{s3_bucket}/manifest",
        model="vit_ti_16",
        weights="random",
        image_size=32,
        commit_interval_s=0,
    )
    summary = run(
        config, embedder=FakeEmbedPatches, embedder_kwargs={"embedding_dim": 192, "num_classes": 1000}
    )
    assert (summary.processed, summary.errors) == (10, 0) and summary.startup.get("manifest", 0) > 0
    from pipeline.storage import resolve_uri

    fs, root = resolve_uri(out)
    table = pads.dataset(root, filesystem=fs, format="parquet").to_table(columns=["key"])
    assert sorted(table["key"].to_pylist()) == sorted(names)
    left = s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/_staging/").get("KeyCount", 0)
    assert left == 0, "the sorted buckets are removed with the run's staging"
