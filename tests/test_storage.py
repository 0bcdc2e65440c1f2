"""pipeline/storage.py: literal S3 URIs, and removing and moving files without S3 directory markers."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline import storage
from pipeline.storage import InputError, delete_file, delete_tree, move, resolve_uri, split_s3_uri

# Prefixes and names a URL parser would mangle: percent-decoding, '#' and '?' cut off, '+' as a space.
LITERAL_KEYS = ("pc%41", "we#ird", "q?x", "a b+c=d", "ünï", "x%2Fy", "a=b&c=%zz")

# --------------------------------------------------------------------------------------------------------
# URIs


@pytest.mark.parametrize("prefix", LITERAL_KEYS)
def test_s3_uris_are_split_literally(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"s3://bkt/{prefix}/sub {prefix}/"
    assert split_s3_uri(uri) == ("bkt", f"{prefix}/sub {prefix}")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = resolve_uri(uri)
    assert isinstance(fs, pafs.S3FileSystem) and path == f"bkt/{prefix}/sub {prefix}"


def test_split_s3_uri_edges() -> None:
    assert split_s3_uri("s3://bkt") == ("bkt", "")
    assert split_s3_uri("S3://bkt/in#embeddings") == ("bkt", "in#embeddings")
    assert split_s3_uri("s3://bkt/in?versionId=3") == ("bkt", "in?versionId=3")
    with pytest.raises(InputError, match="needs a bucket"):
        split_s3_uri("s3:///key")
    with pytest.raises(InputError, match="must start with s3://"):
        split_s3_uri("/local/path")


def test_file_uris_are_urls_but_keep_hash_and_question_mark(tmp_path: Path) -> None:
    assert resolve_uri(f"file://{tmp_path}/a%20b")[1] == f"{tmp_path}/a b"
    assert resolve_uri(f"file://{tmp_path}/we#ird?x")[1] == f"{tmp_path}/we#ird?x"
    assert resolve_uri(f"{tmp_path}/pc%41")[1] == f"{tmp_path}/pc%41"  # a plain path is never decoded


# --------------------------------------------------------------------------------------------------------
# S3 (moto's server on 127.0.0.1): literal keys through pyarrow and boto3


def _keys(s3, bucket: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _put(s3, bucket: str, *keys: str) -> None:
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())


@pytest.mark.integration
def test_pyarrow_and_boto3_keep_literal_keys(s3_server: str, s3_bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    names = [f"{p}/{p}.bin" for p in LITERAL_KEYS]
    _put(s3, s3_bucket, *names, "pcA/decoy.bin", "we/decoy.bin", "q/decoy.bin")
    for prefix in LITERAL_KEYS:
        fs, root = resolve_uri(f"s3://{s3_bucket}/{prefix}")
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        assert [i.path for i in infos] == [f"{s3_bucket}/{prefix}/{prefix}.bin"]
        with fs.open_input_stream(infos[0].path) as f:
            assert f.read() == f"{prefix}/{prefix}.bin".encode()
        with fs.open_output_stream(f"{root}#out/{prefix}?.bin") as f:
            f.write(b"w")
    expected = names + [f"{p}#out/{p}?.bin" for p in LITERAL_KEYS] + ["pcA/decoy.bin", "q/decoy.bin"]
    assert _keys(s3, s3_bucket) == sorted([*expected, "we/decoy.bin"])


@pytest.mark.integration
def test_a_listing_client_leaves_timestamps_unparsed(s3_server: str, s3_bucket: str) -> None:
    import datetime as dt

    from pipeline.storage import s3_client

    _put(s3_client(), s3_bucket, "a/1.jpg", "a/2.jpg")
    parsed = s3_client().list_objects_v2(Bucket=s3_bucket)["Contents"]
    raw = s3_client(parse_timestamps=False).list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [(o["Key"], o["Size"]) for o in raw] == [(o["Key"], o["Size"]) for o in parsed]
    assert isinstance(parsed[0]["LastModified"], dt.datetime)
    assert isinstance(raw[0]["LastModified"], str)  # as S3 sent it
    again = s3_client().list_objects_v2(Bucket=s3_bucket)["Contents"]  # other clients still parse them
    assert isinstance(again[0]["LastModified"], dt.datetime)


# --------------------------------------------------------------------------------------------------------
# delete_file, delete_tree, move: no key ending in '/' afterwards


@pytest.mark.integration
def test_s3_delete_file_leaves_no_marker(s3_server: str, s3_bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    _put(s3, s3_bucket, "o#1/_staging/r/a.parquet", "o#1/b", "q?x/only.bin")
    fs, root = resolve_uri(f"s3://{s3_bucket}")
    delete_file(fs, f"{root}/o#1/_staging/r/a.parquet")
    delete_file(fs, f"{root}/q?x/only.bin")
    delete_file(fs, f"{root}/q?x/never-there.bin")  # not an error
    assert _keys(s3, s3_bucket) == ["o#1/b"]


@pytest.mark.integration
def test_s3_delete_tree_removes_everything_under_it_and_no_more(
    s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    monkeypatch.setattr(storage, "S3_DELETE_BATCH", 2)  # several DeleteObjects requests
    s3 = boto3.client("s3", endpoint_url=s3_server)
    tree = [f"out#e/_staging/{run}/{i}.parquet" for run in ("r1", "r 2") for i in range(3)]
    _put(s3, s3_bucket, *tree, "out#e/_staging/", "out#e/_staging/r1/", "out#e/part-0.parquet")
    _put(s3, s3_bucket, "out#e/_staging.json", "out#e/_stagingX/keep")  # same prefix, not in the tree
    fs, root = resolve_uri(f"s3://{s3_bucket}/out#e")
    assert delete_tree(fs, f"{root}/_staging") == len(tree) + 2  # the old markers go too
    assert _keys(s3, s3_bucket) == ["out#e/_staging.json", "out#e/_stagingX/keep", "out#e/part-0.parquet"]
    assert delete_tree(fs, f"{root}/_staging") == 0  # gone already: not an error
    assert delete_tree(fs, f"{root}/_stagingX/") == 1
    assert not [k for k in _keys(s3, s3_bucket) if k.endswith("/")]
    with pytest.raises(ValueError, match="whole bucket"):
        delete_tree(fs, s3_bucket)
    with pytest.raises(FileNotFoundError):
        delete_tree(fs, "no-such-bucket-4242/x")


@pytest.mark.integration
def test_s3_move_leaves_no_marker(s3_server: str, s3_bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    _put(s3, s3_bucket, "o?x/_staging/r/u1.parquet", "o?x/_staging/r/u2.parquet")
    fs, root = resolve_uri(f"s3://{s3_bucket}/o?x")
    move(fs, f"{root}/_staging/r/u1.parquet", f"{root}/part ü+1.parquet")
    move(fs, f"{root}/_staging/r/u2.parquet", f"{root}/part ü+1.parquet")  # replaces
    assert _keys(s3, s3_bucket) == ["o?x/part ü+1.parquet"]
    body = s3.get_object(Bucket=s3_bucket, Key="o?x/part ü+1.parquet")["Body"].read()
    assert body == b"o?x/_staging/r/u2.parquet"
    with pytest.raises(FileNotFoundError):
        move(fs, f"{root}/_staging/r/u1.parquet", f"{root}/x.parquet")
    assert _keys(s3, s3_bucket) == ["o?x/part ü+1.parquet"]


@pytest.mark.integration
def test_s3_move_copies_large_objects_in_parts(
    s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    monkeypatch.setattr(storage, "S3_COPY_MAX_BYTES", 5 * 2**20)  # S3's smallest part size
    s3 = boto3.client("s3", endpoint_url=s3_server)
    data = os.urandom(6 * 2**20)
    s3.put_object(Bucket=s3_bucket, Key="big/a", Body=data)
    fs, root = resolve_uri(f"s3://{s3_bucket}")
    move(fs, f"{root}/big/a", f"{root}/big#moved/a")
    assert _keys(s3, s3_bucket) == ["big#moved/a"]
    assert s3.get_object(Bucket=s3_bucket, Key="big#moved/a")["Body"].read() == data


def test_local_delete_and_move(tmp_path: Path) -> None:
    fs = pafs.LocalFileSystem()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("k")
    tree = tmp_path / "out" / "_staging" / "r"
    tree.mkdir(parents=True)
    for name in ("a", "b"):
        (tree / name).write_text(name)
    (tree / "link").symlink_to(outside, target_is_directory=True)
    move(fs, str(tree / "a"), str(tmp_path / "out" / "part-a"))
    assert (tmp_path / "out" / "part-a").read_text() == "a" and not (tree / "a").exists()
    delete_file(fs, str(tree / "b"))
    delete_file(fs, str(tree / "b"))  # missing: not an error
    assert delete_tree(fs, str(tmp_path / "out" / "_staging")) == 1  # the symlink, not what it points to
    assert not (tmp_path / "out" / "_staging").exists() and (outside / "keep.txt").exists()
    assert delete_tree(fs, str(tmp_path / "out" / "_staging")) == 0
    with pytest.raises(FileNotFoundError):
        move(fs, str(tree / "a"), str(tmp_path / "x"))
