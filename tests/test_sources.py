"""pipeline/sources: URIs, listing, and the read stage for loose files, webdataset tars and Parquet."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ConfigError, JobConfig
from pipeline.rows import unpack_extra
from pipeline.sources import (
    SHARD_ERROR_SUFFIX,
    InputError,
    ReadShards,
    Shard,
    check_parquet_columns,
    check_unique_keys,
    list_shards,
    resolve_uri,
    shards_to_items,
)
from pipeline.sources.parquet import kept_column_types

# --------------------------------------------------------------------------------------------------------
# helpers


def image_bytes(fmt: str = "PNG", color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format=fmt)
    return buf.getvalue()


PNG = image_bytes("PNG")
JPG = image_bytes("JPEG")


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def tar_bytes(members: list[tuple[str, bytes]], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for info in extra or []:
            tf.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def parquet_bytes(table: pa.Table, **kwargs) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kwargs)
    return buf.getvalue()


def items_batch(shards: list[Shard]) -> dict[str, np.ndarray]:
    """The batch ReadShards gets from Ray Data for these shards (one column per item field)."""
    items = shards_to_items(shards)
    batch = {k: np.array([item[k] for item in items]) for k in ("path", "rel", "kind", "size")}
    batch["keys"] = np.empty(len(items), dtype=object)
    batch["keys"][:] = [item["keys"] for item in items]
    return batch


def read_all(
    uri: str, fmt: str = "auto", shards: list[Shard] | None = None, **kwargs
) -> list[tuple[str, str, bytes | None, str | None]]:
    """Lists and reads `uri`, returning (key, shard, bytes, error) rows; checks the batch contract."""
    shards = list_shards(uri, fmt) if shards is None else shards
    reader = ReadShards(uri, **kwargs)
    limit = kwargs.get("rows_per_batch", 256)
    batch = items_batch(shards)
    rows: list[tuple[str, str, bytes | None, str | None]] = []
    for out in reader(batch):
        assert list(out) == ["key", "shard", "bytes", "error", "extra", "bytes_sha256"]
        n = len(out["key"])
        assert 1 <= n <= limit
        for column in out.values():
            assert column.dtype == object and column.shape == (n,)
        rows.extend(zip(out["key"], out["shard"], out["bytes"], out["error"], strict=True))
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys)), "keys must be unique"
    for _, _, data, error in rows:
        assert (data is None) != (error is None)
        assert error is None or error.startswith("read: ")
    return rows


def by_key(rows: list) -> dict:
    return {key: (data, error) for key, _, data, error in rows}


# --------------------------------------------------------------------------------------------------------
# resolve_uri


def test_resolve_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = resolve_uri("data/in/")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "data" / "in")
    assert resolve_uri(f"file://{tmp_path}/a%20b")[1] == f"{tmp_path}/a b"
    assert resolve_uri(str(tmp_path))[1] == str(tmp_path)


def test_resolve_s3_uri_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = resolve_uri("s3://bucket-x/some/prefix/")
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bucket-x/some/prefix"
    assert resolve_uri("s3://bucket-x")[1] == "bucket-x"


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("", "No input"),
        ("s3:///prefix", "needs a bucket"),
        ("gs://b/p", "not supported"),
        ("file://host/x", "local"),
    ],
)
def test_resolve_bad_uris(uri: str, words: str) -> None:
    with pytest.raises(InputError, match=words):
        resolve_uri(uri)


def test_bad_endpoint_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "ftp://example")
    with pytest.raises(InputError, match="AWS_ENDPOINT_URL"):
        resolve_uri("s3://bucket-x/p")


# --------------------------------------------------------------------------------------------------------
# list_shards


def test_list_loose_files_recursive_sorted_hidden_ignored(tmp_path: Path) -> None:
    write_files(
        tmp_path,
        {
            "b/nested/deep/img 1.JPG": JPG,
            "a.png": PNG,
            "noext": b"x",
            "notes.txt": b"hello",
            "_SUCCESS": b"",
            ".DS_Store": b"x",
            "_staging/x.png": PNG,
            "b/.hidden/y.png": PNG,
            "b/._y.png": PNG,
        },
    )
    shards = list_shards(str(tmp_path))
    assert [s.rel for s in shards] == ["a.png", "b/nested/deep/img 1.JPG", "noext", "notes.txt"]
    assert {s.kind for s in shards} == {"file"}
    first = shards[0]
    assert first.path == str(tmp_path / "a.png") and first.size == len(PNG)
    assert shards_to_items(shards)[0] == {
        "path": first.path,
        "rel": "a.png",
        "kind": "file",
        "size": len(PNG),
        "keys": None,
    }


def test_list_single_file(tmp_path: Path) -> None:
    write_files(tmp_path, {"one.tar": tar_bytes([("k.jpg", JPG)])})
    (shard,) = list_shards(str(tmp_path / "one.tar"))
    assert shard.rel == "one.tar" and shard.kind == "webdataset"


def test_format_auto_detection(tmp_path: Path) -> None:
    write_files(
        tmp_path / "w", {"s-000.tar": tar_bytes([]), "sub/s-001.TAR": tar_bytes([]), "_index.json": b""}
    )
    assert {s.kind for s in list_shards(str(tmp_path / "w"))} == {"webdataset"}
    table = pa.table({"image": [PNG]})
    write_files(
        tmp_path / "p", {"part-0.parquet": parquet_bytes(table), "x/part-1.parquet": parquet_bytes(table)}
    )
    assert [s.kind for s in list_shards(str(tmp_path / "p"))] == ["parquet", "parquet"]


def test_format_mixed_needs_explicit_format(tmp_path: Path) -> None:
    write_files(tmp_path, {"s-000.tar": tar_bytes([("a.jpg", JPG)]), "s-000.idx": b"{}", "cat.jpg": JPG})
    with pytest.raises(InputError, match=r"1 \.tar, 0 \.parquet and 2 other.*--format"):
        list_shards(str(tmp_path))
    assert [s.rel for s in list_shards(str(tmp_path), "webdataset")] == ["s-000.tar"]
    files = list_shards(str(tmp_path), "files")
    assert [(s.rel, s.kind) for s in files] == [
        ("cat.jpg", "file"),
        ("s-000.idx", "file"),
        ("s-000.tar", "file"),
    ]
    with pytest.raises(InputError, match=r"no \.parquet files"):
        list_shards(str(tmp_path), "parquet")


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="Unknown input format 'zip'"):
        list_shards(str(tmp_path), "zip")


def test_missing_and_empty_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"does not exist\.$"):
        list_shards(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="is empty"):
        list_shards(str(tmp_path))
    write_files(tmp_path, {"_SUCCESS": b"", ".keep": b"", "_tmp/a.jpg": JPG})
    with pytest.raises(InputError, match=r"names starting with '_' or '\.' are ignored"):
        list_shards(str(tmp_path))


# --------------------------------------------------------------------------------------------------------
# loose files


def test_read_loose_files(tmp_path: Path) -> None:
    files = {"a.png": PNG, "b/c d.JPG": JPG, "b/noext": b"not an image", "empty.jpg": b""}
    write_files(tmp_path, files)
    rows = read_all(str(tmp_path), rows_per_batch=3)
    assert [(k, s) for k, s, _, _ in rows] == [(k, k) for k in sorted(files)]
    assert by_key(rows) == {k: (v, None) for k, v in files.items()}


def test_loose_file_vanished_and_too_large(tmp_path: Path) -> None:
    write_files(tmp_path, {"gone.jpg": JPG, "big.png": b"x" * 5000, "ok.png": PNG})
    shards = list_shards(str(tmp_path))
    (tmp_path / "gone.jpg").unlink()
    reader = ReadShards(str(tmp_path), max_image_bytes=4096, retry_backoff_s=0)
    rows = {key: (data, err) for s in shards for key, data, err in reader.read_shard(s)}
    assert rows["ok.png"] == (PNG, None)
    assert rows["big.png"][1] == "read: image object is 5000 bytes, over --max-object-bytes (4096 bytes)"
    assert rows["gone.jpg"][0] is None and "FileNotFoundError" in str(rows["gone.jpg"][1])


def test_reader_pickles_without_filesystem(tmp_path: Path) -> None:
    reader = ReadShards(str(tmp_path))
    _ = reader.fs
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._fs is None and isinstance(clone.fs, pafs.LocalFileSystem)


# --------------------------------------------------------------------------------------------------------
# webdataset tars


def test_tar_samples_grouped_across_unsorted_members(tmp_path: Path) -> None:
    members = [
        ("0002.json", b"{}"),
        ("sub/dir/0001.cls", b"3"),
        ("0001.png", PNG),
        ("0002.txt", b"caption"),
        ("sub/dir/0001.JPG", JPG),
        ("0001.json", b"{}"),
        ("0002.PNG", PNG),
        ("0003.txt", b"no image here"),
        ("0003.json", b"{}"),
        ("0004.seg.png", PNG),  # ext "seg.png" is not an image extension (webdataset convention)
        ("./0005.jpeg", JPG),
        ("0005.png", PNG),
        ("0001.jpg", JPG),  # preferred to the earlier 0001.png even though it comes later
        ("README", b"no extension: not a sample"),
        (".hidden.jpg", JPG),
    ]
    link = tarfile.TarInfo("0006.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    folder = tarfile.TarInfo("sub")
    folder.type = tarfile.DIRTYPE
    write_files(tmp_path, {"shards/s 0.tar": tar_bytes(members, extra=[folder, link])})
    rows = read_all(str(tmp_path / "shards"), rows_per_batch=2)
    assert {r[1] for r in rows} == {"s 0.tar"}
    got = by_key(rows)
    assert got == {
        "s 0.tar#0001": (JPG, None),
        "s 0.tar#0002": (PNG, None),
        "s 0.tar#0003": (None, "read: tar sample has no image member (found: txt, json)"),
        "s 0.tar#0004": (None, "read: tar sample has no image member (found: seg.png)"),
        "s 0.tar#0005": (JPG, None),
        "s 0.tar#sub/dir/0001": (JPG, None),
    }


def test_tar_member_over_limit_and_empty_tar(tmp_path: Path) -> None:
    write_files(
        tmp_path, {"a.tar": tar_bytes([("big.png", b"x" * 3000), ("ok.png", PNG)]), "b.tar": tar_bytes([])}
    )
    rows = read_all(str(tmp_path), max_image_bytes=2048)
    assert by_key(rows) == {
        "a.tar#big": (None, "read: tar member 'big.png' is 3000 bytes, over --max-object-bytes (2048 bytes)"),
        "a.tar#ok": (PNG, None),
    }


def test_tar_pending_limit_still_reads_everything(tmp_path: Path) -> None:
    members = [(f"{i:04d}.png", image_bytes("PNG", (i, i, i))) for i in range(20)]
    write_files(tmp_path, {"s.tar": tar_bytes(members)})
    rows = read_all(str(tmp_path), max_pending_bytes=200)
    assert by_key(rows) == {f"s.tar#{name[:4]}": (data, None) for name, data in members}


def _good_tar(n: int = 6) -> tuple[bytes, list[tuple[str, bytes]]]:
    members = []
    for i in range(n):
        members += [
            (f"{i:04d}.txt", b"caption %d" % i),
            (f"{i:04d}.jpg", image_bytes("JPEG", (i * 30, 0, 0))),
        ]
    return tar_bytes(members), members


def _member_offsets(data: bytes) -> dict[str, int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: m.offset for m in tf.getmembers()}


def test_truncated_tar_keeps_readable_samples(tmp_path: Path) -> None:
    data, members = _good_tar()
    cut = _member_offsets(data)["0003.jpg"] + 512 + 100  # inside 0003.jpg's data
    write_files(tmp_path, {"t.tar": data[:cut]})
    rows = read_all(str(tmp_path))
    got = by_key(rows)
    for i in range(3):
        assert got[f"t.tar#{i:04d}"] == (dict(members)[f"{i:04d}.jpg"], None)
    assert got["t.tar#0003"][0] is None and "'0003.jpg' is truncated" in got["t.tar#0003"][1]
    error = got["t.tar" + SHARD_ERROR_SUFFIX][1]
    assert error.startswith("read: tar shard is damaged: the archive ends inside member '0003.jpg'")
    assert len(rows) == 5  # 3 good samples, the truncated one, one shard error row


def test_tar_cut_inside_skipped_member_and_at_boundary(tmp_path: Path) -> None:
    data, _ = _good_tar()
    offsets = _member_offsets(data)
    write_files(
        tmp_path,
        {
            "a.tar": data[: offsets["0002.txt"] + 512 + 3],  # inside a text member, which is never read
            "b.tar": data[: offsets["0002.txt"]],  # exactly at a member boundary: no end marker
            "c.tar": data[: offsets["0002.txt"] + 100],  # inside a header
        },
    )
    got = by_key(read_all(str(tmp_path)))
    for shard in ("a.tar", "b.tar", "c.tar"):
        assert got[f"{shard}#0000"][1] is None and got[f"{shard}#0001"][1] is None
        assert "damaged" in got[shard + SHARD_ERROR_SUFFIX][1]
    assert "ends early" in got["a.tar" + SHARD_ERROR_SUFFIX][1]
    assert "no end-of-archive marker" in got["b.tar" + SHARD_ERROR_SUFFIX][1]
    assert "cut inside a header" in got["c.tar" + SHARD_ERROR_SUFFIX][1]
    assert "a.tar#0002" in got  # the sample whose caption was cut still has no image: an error row
    assert got["a.tar#0002"][1] == "read: tar sample has no image member (found: txt)"
    assert len(got) == 4 + 3 + 3  # b.tar and c.tar have no 0002 sample at all


def test_corrupt_header_mid_tar_resyncs(tmp_path: Path) -> None:
    data, members = _good_tar()
    at = _member_offsets(data)["0002.jpg"]
    broken = data[:at] + b"\xff" * 512 + data[at + 512 :]
    write_files(tmp_path, {"c.tar": broken})
    got = by_key(read_all(str(tmp_path)))
    assert got["c.tar#0002"] == (None, "read: tar sample has no image member (found: txt)")
    for i in (0, 1, 3, 4, 5):  # samples after the damage are recovered
        assert got[f"c.tar#{i:04d}"] == (dict(members)[f"{i:04d}.jpg"], None)
    assert re.search(
        rf"skipped \d+ unreadable 512-byte header block\(s\) from byte {at};", got["c.tar#.error"][1]
    )


def test_not_a_tar(tmp_path: Path) -> None:
    write_files(tmp_path, {"junk.tar": os.urandom(3000), "empty.tar": b""})
    got = by_key(read_all(str(tmp_path)))
    assert set(got) == {"junk.tar#.error", "empty.tar#.error"}
    assert "empty file" in got["empty.tar#.error"][1]
    assert "header block(s) from byte 0" in got["junk.tar#.error"][1]


# --------------------------------------------------------------------------------------------------------
# Parquet


def test_parquet_keys_row_groups_and_nulls(tmp_path: Path) -> None:
    images = [PNG, None, JPG, b"", PNG, JPG, PNG]
    table = pa.table({"id": ["a", "b", "c", "d", None, "f", "g"], "image": pa.array(images, pa.binary())})
    write_files(tmp_path, {"dir/part 0.parquet": parquet_bytes(table, row_group_size=3)})
    rows = read_all(str(tmp_path), rows_per_batch=2)
    assert [r[0] for r in rows] == [f"dir/part 0.parquet#{i}" for i in range(7)]
    assert {r[1] for r in rows} == {"dir/part 0.parquet"}
    got = by_key(rows)
    assert got["dir/part 0.parquet#1"] == (None, "read: Parquet column 'image' is null in row 1")
    assert got["dir/part 0.parquet#3"] == (b"", None)
    assert got["dir/part 0.parquet#6"] == (PNG, None)

    keyed = by_key(read_all(str(tmp_path), key_column="id"))
    assert set(keyed) == {"a", "b", "c", "d", "f", "g", "dir/part 0.parquet#4"}
    assert keyed["c"] == (JPG, None)
    assert keyed["dir/part 0.parquet#4"] == (None, "read: key column 'id' is null in row 4")


def _extras(uri: str, width: int, **kwargs) -> dict[str, tuple]:
    """key → (passed-through values, bytes_sha256) of every row read from `uri`."""
    out: dict[str, tuple] = {}
    for batch in ReadShards(uri, **kwargs)(items_batch(list_shards(uri))):
        for key, extra, sha in zip(batch["key"], batch["extra"], batch["bytes_sha256"], strict=True):
            out[key] = (unpack_extra(extra, width), sha)
    return out


def test_parquet_keep_columns_pass_through_typed(tmp_path: Path) -> None:
    big = 2**62 + 1
    first = pa.table(
        {
            "image": pa.array([PNG, JPG, None], pa.binary()),
            "caption": ["a cat", None, "a fox"],
            "id": pa.array([big, 2, None], pa.int64()),
            "tags": pa.array([["x", "y"], [], None], pa.list_(pa.string())),
        }
    )
    second = pa.table({"image": pa.array([PNG], pa.binary()), "id": pa.array([7], pa.int32())})
    third = pa.table({"image": pa.array([PNG], pa.binary()), "id": pa.array(["seven"])})
    write_files(
        tmp_path,
        {
            "a.parquet": parquet_bytes(first),
            "b.parquet": parquet_bytes(second),
            "c.parquet": parquet_bytes(third),
        },
    )
    keep = kept_column_types(str(tmp_path), list_shards(str(tmp_path))[0], ("caption", "id", "tags"))
    assert keep == (("caption", pa.string()), ("id", pa.int64()), ("tags", pa.list_(pa.string())))
    got = _extras(str(tmp_path), 3, keep_columns=keep)
    assert got["a.parquet#0"] == (("a cat", big, ["x", "y"]), hashlib.sha256(PNG).hexdigest())
    assert got["a.parquet#1"][0] == (None, 2, [])
    assert got["a.parquet#2"] == (("a fox", None, None), None)  # a null image: an error row, still kept
    assert got["b.parquet#0"][0] == (None, 7, None)  # no caption or tags in this file; int32 → int64
    error = by_key(read_all(str(tmp_path), keep_columns=keep))["c.parquet" + SHARD_ERROR_SUFFIX][1]
    assert "column 'id' is string in this file but int64 in the output" in error
    with pytest.raises(InputError, match="has no column 'url'"):
        kept_column_types(str(tmp_path), list_shards(str(tmp_path))[0], ("url",))


def test_tar_sidecars_are_kept_with_their_sample(tmp_path: Path) -> None:
    members = [
        ("0000.jpg", JPG),
        ("0000.json", b'{"url": "http://x/0"}'),
        ("0000.txt", "caption é".encode()),
        ("0000.cls", b"7\n"),
        ("0001.cls", b"not a number"),
        ("0001.jpg", JPG),
        ("0002.png", PNG),  # a sample held to the end (a JPEG could still follow)
        ("0002.txt", b"late caption"),
        ("0003.txt", b"no image"),
    ]
    write_files(tmp_path, {"s.tar": tar_bytes(members)})
    got = _extras(str(tmp_path), 3)
    assert got["s.tar#0000"] == (('{"url": "http://x/0"}', "caption é", 7), hashlib.sha256(JPG).hexdigest())
    assert got["s.tar#0001"][0] == (None, None, None)
    assert got["s.tar#0002"][0] == (None, "late caption", None)
    assert got["s.tar#0003"] == ((None, "no image", None), None)  # an error row keeps its sidecars


def test_parquet_custom_and_struct_columns(tmp_path: Path) -> None:
    hf = pa.table(
        {"img": [{"bytes": PNG, "path": "x.png"}, None, {"bytes": None, "path": "y"}], "n": [1, 2, 3]}
    )
    write_files(tmp_path, {"hf.parquet": parquet_bytes(hf)})
    got = by_key(read_all(str(tmp_path), image_column="img", key_column="n"))
    assert got["1"] == (PNG, None)
    assert got["2"] == (None, "read: Parquet column 'img' is null in row 1")
    assert got["3"] == (
        None,
        "read: Parquet column 'img' holds only a file path ('y') in row 2, not the image bytes, so it was "
        "not embedded; export the dataset with the image bytes embedded (with `datasets`: "
        "embed_external_files, or cast the column to Image(decode=True), before to_parquet)",
    )
    empty_path = pa.table({"img": [{"bytes": None, "path": ""}, {"bytes": b"x" * 100, "path": "z"}]})
    write_files(tmp_path / "e", {"e.parquet": parquet_bytes(empty_path)})
    got = by_key(read_all(str(tmp_path / "e"), image_column="img", max_image_bytes=99))
    assert got["e.parquet#0"] == (None, "read: Parquet column 'img' is null in row 0")
    assert got["e.parquet#1"] == (
        None,
        "read: image value in row 1 is 100 bytes, over --max-object-bytes (99 bytes)",
    )


def test_parquet_missing_or_wrong_column(tmp_path: Path) -> None:
    write_files(
        tmp_path,
        {
            "a.parquet": parquet_bytes(pa.table({"jpg": [JPG], "caption": ["c"]})),
            "b.parquet": parquet_bytes(pa.table({"image": [1, 2]})),
            "c.parquet": parquet_bytes(pa.table({"image": [JPG]})),
        },
    )
    got = by_key(read_all(str(tmp_path), key_column=None))
    assert got["a.parquet#.error"] == (
        None,
        "read: Parquet file has no column 'image' (columns: jpg, caption); the image bytes look to be in "
        "'jpg': pass --image-column jpg",
    )
    assert got["b.parquet#.error"] == (
        None,
        "read: Parquet file has column 'image' of type int64, not image bytes (binary, or a struct with a "
        "binary 'bytes' field); no column holds image bytes (binary, or a struct with a binary 'bytes' "
        "field)",
    )
    assert got["c.parquet#0"] == (JPG, None)
    missing_key = by_key(read_all(str(tmp_path / "c.parquet"), key_column="id"))
    assert "no key column 'id'" in missing_key["c.parquet#.error"][1]


def test_parquet_unreadable_and_truncated(tmp_path: Path) -> None:
    good = parquet_bytes(pa.table({"image": [PNG] * 4}), row_group_size=2)
    write_files(tmp_path, {"junk.parquet": b"PAR1 not really", "cut.parquet": good[: len(good) // 2]})
    got = by_key(read_all(str(tmp_path)))
    assert set(got) == {"cut.parquet#.error", "junk.parquet#.error"}
    assert got["junk.parquet#.error"][1].startswith("read: not a readable Parquet file: ")


def test_parquet_corrupt_row_group_keeps_the_others(tmp_path: Path) -> None:
    table = pa.table({"image": [bytes([i]) * 300 for i in range(6)]})
    data = bytearray(parquet_bytes(table, row_group_size=2, compression="snappy", use_dictionary=False))
    meta = pq.ParquetFile(io.BytesIO(bytes(data))).metadata
    column = meta.row_group(1).column(0)
    start = column.data_page_offset
    data[start + 8 : start + 40] = b"\x00" * 32  # garble row group 1's page
    write_files(tmp_path, {"rg.parquet": bytes(data)})
    got = by_key(read_all(str(tmp_path), retry_backoff_s=0))
    for i in (0, 1, 4, 5):
        assert got[f"rg.parquet#{i}"] == (bytes([i]) * 300, None)
    assert "row group 1 (rows 2–3) unreadable" in got["rg.parquet#.error"][1]


# --------------------------------------------------------------------------------------------------------
# local symlinks: directories are not entered, files are files


def test_symlinked_directories_are_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "in"
    write_files(root, {"a.jpg": JPG, "sub/b.png": PNG, "sub/c.jpg": JPG})
    write_files(tmp_path / "elsewhere", {"far.jpg": JPG})
    (root / "loop").symlink_to(root, target_is_directory=True)  # a loop: once 123 rows out of 3 images
    (root / "sub" / "up").symlink_to("..", target_is_directory=True)
    (root / "far").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "sub" / "alias.jpg").symlink_to(root / "a.jpg")  # a symlinked file: read once, as a file
    (root / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # dangling: an error row, not a silent gap
    os.mkfifo(root / "pipe.jpg")  # would block a reader forever: skipped
    shards = list_shards(str(root))
    assert [(s.rel, s.size) for s in shards] == [
        ("a.jpg", len(JPG)),
        ("gone.jpg", 0),
        ("sub/alias.jpg", len(JPG)),
        ("sub/b.png", len(PNG)),
        ("sub/c.jpg", len(JPG)),
    ]
    got = by_key(read_all(str(root), retry_backoff_s=0))
    assert got["sub/alias.jpg"] == (JPG, None) and got["a.jpg"] == (JPG, None)
    assert got["gone.jpg"][0] is None and "FileNotFoundError" in str(got["gone.jpg"][1])
    assert len(got) == 5

    (tmp_path / "link-to-in").symlink_to(root, target_is_directory=True)  # the root itself may be a link
    assert [s.rel for s in list_shards(str(tmp_path / "link-to-in"))] == [s.rel for s in shards]


def test_output_and_input_overlap_through_symlinks(tmp_path: Path) -> None:
    src, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    (elsewhere / "out").symlink_to(src / "embeddings", target_is_directory=True)  # into the input
    (tmp_path / "in-link").symlink_to(src, target_is_directory=True)
    (src / "up").symlink_to(tmp_path, target_is_directory=True)
    refused = [
        (str(src), str(elsewhere / "out")),  # the output is a symlink into the input
        (str(src), str(elsewhere / "out" / "deeper")),
        (str(tmp_path / "in-link"), str(src / "o")),  # the input is a symlink to a parent of the output
        (str(src / "up" / "x"), str(tmp_path / "x" / "o")),  # the input reached through a symlink
        (f"file://{tmp_path}/in-link", str(src)),
    ]
    for input_, output in refused:
        with pytest.raises(ConfigError, match="--output must be outside --input"):
            JobConfig(input=input_, output=output)
    JobConfig(input=str(src), output=str(tmp_path / "in2"))  # a common prefix is not an overlap
    JobConfig(input=str(tmp_path / "in-link"), output=str(elsewhere / "o"))


def test_s3_overlap_is_literal() -> None:
    JobConfig(input="s3://b/in", output="s3://b/in#embeddings")  # not s3://b/in cut at '#'
    JobConfig(input="s3://b/pc%41", output="s3://b/pcA/out")  # not percent-decoded
    JobConfig(input="s3://b/q?x", output="s3://b/q")
    for input_, output in [
        ("s3://b/in", "S3://b/in/out"),
        ("s3://b/we#ird/", "s3://b/we#ird"),
        ("s3://b", "s3://b/o"),
    ]:
        with pytest.raises(ConfigError, match="--output must be outside --input"):
            JobConfig(input=input_, output=output)


# --------------------------------------------------------------------------------------------------------
# planning-time checks: the Parquet columns, unique keys


def _shard(root: Path, rel: str) -> Shard:
    return next(s for s in list_shards(str(root), "parquet") if s.rel == rel)


def test_check_parquet_columns(tmp_path: Path) -> None:
    hf_image = pa.array([{"bytes": PNG, "path": "p.png"}])
    write_files(
        tmp_path,
        {
            "good.parquet": parquet_bytes(pa.table({"image": [PNG], "id": ["a"]})),
            "hf.parquet": parquet_bytes(pa.table({"img": hf_image, "id": ["a"]})),
            "renamed.parquet": parquet_bytes(pa.table({"jpg": [JPG], "caption": ["c"]})),
            "two.parquet": parquet_bytes(pa.table({"image": ["a path"], "jpg": [JPG], "png": [PNG]})),
            "none.parquet": parquet_bytes(pa.table({"image": [1], "caption": ["c"]})),
            "struct.parquet": parquet_bytes(pa.table({"image": [{"path": "p.png"}]})),
            "junk.parquet": b"PAR1 not really",
        },
    )
    check_parquet_columns(str(tmp_path), _shard(tmp_path, "good.parquet"), "image", None)
    check_parquet_columns(str(tmp_path), _shard(tmp_path, "good.parquet"), "image", "id")
    check_parquet_columns(str(tmp_path), _shard(tmp_path, "hf.parquet"), "img", "id")
    check_parquet_columns(str(tmp_path), _shard(tmp_path, "junk.parquet"), "image", None)  # the reader says
    check_parquet_columns(str(tmp_path), Shard("x", "x.jpg", "file", 1), "image", None)  # not Parquet

    cases = {
        ("renamed.parquet", "image", None): (
            f"Parquet file {tmp_path}/renamed.parquet has no column 'image' (columns: jpg, caption); the "
            "image bytes look to be in 'jpg': pass --image-column jpg."
        ),
        ("two.parquet", "image", None): (
            f"Parquet file {tmp_path}/two.parquet has column 'image' of type string, not image bytes "
            "(binary, or a struct with a binary 'bytes' field); columns holding image bytes: jpg, png; pass "
            "--image-column with one of them."
        ),
        ("none.parquet", "image", None): (
            f"Parquet file {tmp_path}/none.parquet has column 'image' of type int64, not image bytes "
            "(binary, or a struct with a binary 'bytes' field); no column holds image bytes (binary, or a "
            "struct with a binary 'bytes' field)."
        ),
        ("struct.parquet", "image", None): "of type struct<path: string>, not image bytes",
        ("good.parquet", "image", "uid"): (
            f"Parquet file {tmp_path}/good.parquet has no key column 'uid' (columns: image, id); pass "
            "--key-column with one of them, or leave it out to key rows by file and row index."
        ),
    }
    for (rel, image_column, key_column), message in cases.items():
        with pytest.raises(InputError) as info:
            check_parquet_columns(str(tmp_path), _shard(tmp_path, rel), image_column, key_column)
        assert message in str(info.value)
        # The read stage says the same thing about the same file (one definition of an image column).
        (row,) = ReadShards(str(tmp_path), image_column=image_column, key_column=key_column).read_shard(
            _shard(tmp_path, rel)
        )
        subject = f"Parquet file {tmp_path}/{rel}"
        assert row[2] == "read: " + str(info.value).removesuffix(".").replace(subject, "Parquet file")


def test_check_unique_keys(tmp_path: Path) -> None:
    write_files(
        tmp_path,
        {
            "a.parquet": parquet_bytes(pa.table({"image": [PNG] * 4, "id": ["x", None, "y", None]})),
            "b.parquet": parquet_bytes(
                pa.table({"image": [PNG] * 3, "id": ["z", "w", "y"]}), row_group_size=1
            ),
            "c.parquet": parquet_bytes(pa.table({"image": [PNG] * 3, "id": [1, 2, 1]})),
            "d.parquet": parquet_bytes(pa.table({"image": [PNG], "other": ["x"]})),  # no key column
            "e.parquet": b"PAR1 not really",
        },
    )
    shards = {s.rel: s for s in list_shards(str(tmp_path), "parquet")}
    a, b, c, d, e = (shards[f"{n}.parquet"] for n in "abcde")
    check_unique_keys(str(tmp_path), [a, d, e], "id")  # nulls are not keys; d and e are left to the reader
    check_unique_keys(str(tmp_path), [a, Shard("x", "x.jpg", "file", 1)], "id", existing={"z"})

    with pytest.raises(InputError) as info:
        check_unique_keys(str(tmp_path), [a, b], "id")
    assert str(info.value) == (
        f"Key column 'id' holds 'y' more than once, in {tmp_path}/a.parquet row 2 and {tmp_path}/b.parquet "
        "row 2; the output holds each key once: choose a --key-column whose values are unique, or leave it "
        "out to key rows by file and row index."
    )
    with pytest.raises(
        InputError, match=rf"holds '1' more than once, in {tmp_path}/c.parquet row 0 and .* row 2"
    ):
        check_unique_keys(str(tmp_path), [c], "id")
    with pytest.raises(InputError) as info:
        check_unique_keys(str(tmp_path), [a, b], "id", existing=frozenset({"w"}))
    assert str(info.value).startswith(
        f"Key column 'id' holds 'w' in {tmp_path}/b.parquet row 1, a key already in --output"
    )


# --------------------------------------------------------------------------------------------------------
# a retry reads only some keys (Shard.keys)


def test_retry_keys_filter_tar_shards(tmp_path: Path) -> None:
    members = [("0001.jpg", JPG), ("0002.png", PNG), ("0002.jpg", JPG), ("0003.txt", b"t"), ("0004.png", PNG)]
    write_files(tmp_path, {"s.tar": tar_bytes(members), "t.tar": tar_bytes([("9.jpg", JPG)])})
    s_tar, t_tar = list_shards(str(tmp_path))
    retry = [replace(s_tar, keys=("s.tar#0002", "s.tar#0003", "s.tar#9999")), replace(t_tar, keys=())]
    rows = read_all(str(tmp_path), shards=retry)
    assert by_key(rows) == {
        "s.tar#0002": (JPG, None),
        "s.tar#0003": (None, "read: tar sample has no image member (found: txt)"),
    }
    whole = read_all(
        str(tmp_path), shards=[replace(s_tar, keys=("s.tar#0001", "s.tar" + SHARD_ERROR_SUFFIX))]
    )
    assert [r[0] for r in whole] == ["s.tar#0001", "s.tar#0002", "s.tar#0003", "s.tar#0004"]
    assert [r[0] for r in read_all(str(tmp_path), shards=[s_tar])] == [r[0] for r in whole]


def test_retry_keys_filter_parquet_and_loose_files(tmp_path: Path) -> None:
    table = pa.table({"image": pa.array([PNG, None, JPG, PNG], pa.binary()), "id": ["a", "b", "c", None]})
    write_files(tmp_path / "p", {"x.parquet": parquet_bytes(table, row_group_size=2)})
    (shard,) = list_shards(str(tmp_path / "p"))
    rows = read_all(str(tmp_path / "p"), shards=[replace(shard, keys=("x.parquet#1", "x.parquet#2"))])
    assert by_key(rows) == {
        "x.parquet#1": (None, "read: Parquet column 'image' is null in row 1"),
        "x.parquet#2": (JPG, None),
    }
    keyed = read_all(str(tmp_path / "p"), shards=[replace(shard, keys=("c", "x.parquet#3"))], key_column="id")
    assert by_key(keyed) == {
        "c": (JPG, None),
        "x.parquet#3": (None, "read: key column 'id' is null in row 3"),
    }
    everything = read_all(str(tmp_path / "p"), shards=[replace(shard, keys=("x.parquet#.error",))])
    assert len(everything) == 4

    write_files(tmp_path / "f", {"a.jpg": JPG, "b.png": PNG, "c.jpg": JPG})
    files = list_shards(str(tmp_path / "f"))
    flaky = FlakyFS(failures=0, fail_after=0)
    reader = ReadShards(str(tmp_path / "f"), filesystem=flaky)  # type: ignore[arg-type]
    retry = [replace(s, keys=(s.rel,) if s.rel != "b.png" else ("a.jpg",)) for s in files]
    rows = [r for out in reader(items_batch(retry)) for r in zip(out["key"], out["bytes"], strict=True)]
    assert rows == [("a.jpg", JPG), ("c.jpg", JPG)]
    assert set(flaky.opens) == {files[0].path, files[2].path}  # b.png was not even opened
    assert shards_to_items(retry)[1]["keys"] == ["a.jpg"]


def test_batches_takes_shards_like_the_column_interface(tmp_path: Path) -> None:
    write_files(tmp_path / "f", {"a.jpg": JPG, "b.png": PNG})
    tar = tar_bytes([("0001.jpg", JPG), ("0002.png", PNG), ("0003.txt", b"t")])
    write_files(tmp_path / "w", {"s.tar": tar})
    table = pa.table({"image": pa.array([PNG, None, JPG], pa.binary())})
    write_files(tmp_path / "p", {"x.parquet": parquet_bytes(table)})
    a, b, s_tar, x_pq = (s for d in "fwp" for s in list_shards(str(tmp_path / d)))
    reader = ReadShards(str(tmp_path), rows_per_batch=3)

    def batch_rows(batches) -> list[list[tuple]]:
        out = []
        for batch in batches:
            assert list(batch) == ["key", "shard", "bytes", "error", "extra", "bytes_sha256"]
            assert all(column.dtype == object for column in batch.values())
            out.append(list(zip(batch["key"], batch["shard"], batch["bytes"], batch["error"], strict=True)))
        return out

    shards = [a, b, s_tar, x_pq]
    got = batch_rows(reader.batches(iter(shards)))
    assert got == batch_rows(reader(items_batch(shards)))
    assert [len(rows) for rows in got] == [3, 3, 2]
    assert [(key, shard) for rows in got for key, shard, _, _ in rows] == [
        ("a.jpg", "a.jpg"),
        ("b.png", "b.png"),
        ("s.tar#0001", "s.tar"),
        ("s.tar#0002", "s.tar"),
        ("s.tar#0003", "s.tar"),
        ("x.parquet#0", "x.parquet"),
        ("x.parquet#1", "x.parquet"),
        ("x.parquet#2", "x.parquet"),
    ]

    retry = [
        replace(a, keys=()),
        replace(b, keys=("b.png",)),
        replace(s_tar, keys=("s.tar#0003",)),
        replace(x_pq, keys=("x.parquet#2", "x.parquet#9")),
    ]
    got = batch_rows(reader.batches(retry))
    assert got == batch_rows(reader(items_batch(retry)))
    assert [row for rows in got for row in rows] == [
        ("b.png", "b.png", PNG, None),
        ("s.tar#0003", "s.tar", None, "read: tar sample has no image member (found: txt)"),
        ("x.parquet#2", "x.parquet", JPG, None),
    ]
    assert list(reader.batches([])) == []


# --------------------------------------------------------------------------------------------------------
# retries (a filesystem that fails transiently)


class _FlakyStream:
    """Wraps a pyarrow stream; raises OSError once `fail_after` bytes have been read."""

    def __init__(self, inner, fail_after: int) -> None:
        self.inner, self.left = inner, fail_after

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise OSError("connection reset by peer (injected)")
        data = self.inner.read(n if n >= 0 else self.left)
        self.left -= len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.inner.close()


class FlakyFS:
    """Duck-typed filesystem: the first `failures` opens of each path fail mid-stream."""

    def __init__(self, failures: int, fail_after: int) -> None:
        self.fs, self.failures, self.fail_after = pafs.LocalFileSystem(), failures, fail_after
        self.opens: dict[str, int] = {}

    def open_input_stream(self, path: str, **kwargs):
        self.opens[path] = self.opens.get(path, 0) + 1
        stream = self.fs.open_input_stream(path, **kwargs)
        if self.opens[path] <= self.failures:
            return _FlakyStream(stream, self.fail_after)
        return stream


def test_tar_restarts_after_transient_failure_without_duplicates(tmp_path: Path) -> None:
    data, _ = _good_tar()
    write_files(tmp_path, {"s.tar": data})
    shard = list_shards(str(tmp_path))[0]
    flaky = FlakyFS(failures=2, fail_after=len(data) // 2)
    reader = ReadShards(str(tmp_path), filesystem=flaky, retry_backoff_s=0)  # type: ignore[arg-type]
    rows = list(reader.read_shard(shard))
    assert flaky.opens[shard.path] == 3
    assert [r[0] for r in rows] == [f"s.tar#{i:04d}" for i in range(6)]
    assert all(err is None for _, _, err, *_ in rows)

    flaky = FlakyFS(failures=5, fail_after=len(data) // 2)
    reader = ReadShards(str(tmp_path), filesystem=flaky, retries=1, retry_backoff_s=0)  # type: ignore[arg-type]
    rows = list(reader.read_shard(shard))
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys)) and keys[-1] == "s.tar#.error"
    assert "could not be read to the end: OSError: connection reset" in str(rows[-1][2])
    assert all(err is None for _, _, err, *_ in rows[:-1]) and len(rows) >= 2


def test_loose_file_retried(tmp_path: Path) -> None:
    write_files(tmp_path, {"a.jpg": JPG})
    shard = list_shards(str(tmp_path))[0]
    flaky = FlakyFS(failures=1, fail_after=0)
    rows = list(ReadShards(str(tmp_path), filesystem=flaky, retry_backoff_s=0).read_shard(shard))  # type: ignore[arg-type]
    assert rows == [("a.jpg", JPG, None)] and flaky.opens[shard.path] == 2


# --------------------------------------------------------------------------------------------------------
# S3 (moto's server on 127.0.0.1)


@pytest.mark.integration
def test_s3_all_three_kinds(s3_bucket: str) -> None:
    import boto3

    s3 = boto3.client("s3")
    objects = {
        "files/a.png": PNG,
        "files/b dir/C.JPG": JPG,
        "files/_SUCCESS": b"",
        "files/.hidden": b"x",
        "wds/s-000.tar": tar_bytes([("k1.txt", b"t"), ("k2.jpg", JPG), ("k1.png", PNG)]),
        "pq/part-0.parquet": parquet_bytes(pa.table({"image": [PNG, None], "id": ["x", "y"]})),
    }
    for key, body in objects.items():
        s3.put_object(Bucket=s3_bucket, Key=key, Body=body)
    s3.put_object(Bucket=s3_bucket, Key="files/empty-dir/", Body=b"")  # a "folder" marker object

    base = f"s3://{s3_bucket}"
    shards = list_shards(f"{base}/files/")
    assert [(s.rel, s.kind, s.size) for s in shards] == [
        ("a.png", "file", len(PNG)),
        ("b dir/C.JPG", "file", len(JPG)),
    ]
    assert shards[0].path == f"{s3_bucket}/files/a.png"
    assert by_key(read_all(f"{base}/files")) == {"a.png": (PNG, None), "b dir/C.JPG": (JPG, None)}
    assert by_key(read_all(f"{base}/wds")) == {"s-000.tar#k1": (PNG, None), "s-000.tar#k2": (JPG, None)}
    assert by_key(read_all(f"{base}/pq", key_column="id")) == {
        "x": (PNG, None),
        "y": (None, "read: Parquet column 'image' is null in row 1"),
    }
    with pytest.raises(InputError, match="mixes"):
        list_shards(base)


@pytest.mark.integration
@pytest.mark.parametrize("prefix", ["pc%41", "we#ird", "q?x", "a b+c=d", "ünï"])
def test_s3_literal_keys_all_three_kinds(s3_bucket: str, prefix: str) -> None:
    import boto3

    s3 = boto3.client("s3")
    objects = {
        f"{prefix}/files/{prefix}/a%20b#c?d=e+f.png": PNG,
        f"{prefix}/files/ü.JPG": JPG,
        f"{prefix}/wds/{prefix}.tar": tar_bytes([("k#1.jpg", JPG), ("q?2.png", PNG)]),
        f"{prefix}/pq/{prefix}.parquet": parquet_bytes(pa.table({"image": [PNG], "id": [f"{prefix}#0"]})),
        "pcA/files/decoy.jpg": JPG,  # where a percent-decoded 'pc%41' would point
        "we/files/decoy.jpg": JPG,  # where 'we#ird' cut at '#' would point
        "q/files/decoy.jpg": JPG,  # where 'q?x' cut at '?' would point
    }
    for key, body in objects.items():
        s3.put_object(Bucket=s3_bucket, Key=key, Body=body)
    base = f"s3://{s3_bucket}/{prefix}"
    assert by_key(read_all(f"{base}/files/")) == {
        f"{prefix}/a%20b#c?d=e+f.png": (PNG, None),
        "ü.JPG": (JPG, None),
    }
    assert [s.path for s in list_shards(f"{base}/files/ü.JPG")] == [f"{s3_bucket}/{prefix}/files/ü.JPG"]
    assert by_key(read_all(f"{base}/wds")) == {
        f"{prefix}.tar#k#1": (JPG, None),
        f"{prefix}.tar#q?2": (PNG, None),
    }
    assert by_key(read_all(f"{base}/pq", key_column="id")) == {f"{prefix}#0": (PNG, None)}
    shard = list_shards(f"{base}/pq")[0]
    check_parquet_columns(f"{base}/pq", shard, "image", "id")
    with pytest.raises(
        InputError, match=re.escape(f"Parquet file s3://{s3_bucket}/{prefix}/pq/{prefix}.parquet")
    ):
        check_parquet_columns(f"{base}/pq", shard, "img", None)
    check_unique_keys(f"{base}/pq", [shard], "id")
    with pytest.raises(InputError, match="already in --output"):
        check_unique_keys(f"{base}/pq", [shard], "id", existing={f"{prefix}#0"})


@pytest.mark.integration
def test_s3_missing_empty_and_vanished(s3_bucket: str) -> None:
    import boto3

    with pytest.raises(InputError, match="does not exist"):
        list_shards(f"s3://{s3_bucket}/nothing-here")
    with pytest.raises(InputError, match="does not exist"):
        list_shards("s3://no-such-bucket-4242/x")
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="only/_SUCCESS", Body=b"")
    with pytest.raises(InputError, match="is empty"):
        list_shards(f"s3://{s3_bucket}/only")
    s3.put_object(Bucket=s3_bucket, Key="v/a.jpg", Body=JPG)
    s3.put_object(Bucket=s3_bucket, Key="v/b.jpg", Body=JPG)
    shards = list_shards(f"s3://{s3_bucket}/v")
    s3.delete_object(Bucket=s3_bucket, Key="v/a.jpg")
    reader = ReadShards(f"s3://{s3_bucket}/v", retry_backoff_s=0)
    rows = {k: (d, e) for s in shards for k, d, e in reader.read_shard(s)}
    assert rows["b.jpg"] == (JPG, None)
    assert rows["a.jpg"][0] is None and str(rows["a.jpg"][1]).startswith("read: ")


@pytest.mark.integration
def test_s3_unreachable_is_a_clear_input_error(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(InputError, match="Cannot reach the S3 endpoint") as info:
        list_shards("s3://some-bucket/prefix")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(info.value)
