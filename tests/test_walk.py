"""Listing partitions and sorted pages (pipeline/sources/walk.py), locally and on S3 (moto)."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest

from pipeline.sources import list_shards
from pipeline.sources import walk as walk_module
from pipeline.sources.walk import Partition, Walker, explore

# Names whose string order differs from a per-directory walk's: 'a.txt' < 'a/x' < 'a0', plus characters
# that URLs and S3 tools treat specially, and non-ASCII.
NAMES = [
    "a.txt",
    "a/x.jpg",
    "a/b/c.jpg",
    "a0.jpg",
    "b/%41 #1?.jpg",
    "b/+ plus.jpg",
    "b/é.jpg",
    "c/d/e/f.jpg",
    "c/d/g.jpg",
    "top.jpg",
]
HIDDEN = ["_staging/x.jpg", ".git/y.jpg", "b/.hidden.jpg", "b/_tmp.jpg"]


def _tree(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x" * len(name))


def _all_pages(walker: Walker, partitions: list[Partition], size: int = 3) -> list[str]:
    rels = []
    for p in partitions:
        for page in walker.pages(p, size=size):
            assert [rel for _, rel, _ in page] == sorted(rel for _, rel, _ in page)
            rels += [rel for _, rel, _ in page]
    return rels


@pytest.fixture()
def local_tree(tmp_path: Path) -> Path:
    _tree(tmp_path / "in", NAMES + HIDDEN)
    (tmp_path / "elsewhere").mkdir()
    _tree(tmp_path / "elsewhere", ["linked.jpg"])
    os.symlink(tmp_path / "elsewhere", tmp_path / "in" / "linkdir")  # not entered, as list_shards
    return tmp_path / "in"


def test_a_recursive_walk_is_in_string_order_and_matches_the_driver_listing(local_tree: Path):
    walker = Walker(str(local_tree))
    rels = _all_pages(walker, [Partition(0, "", recursive=True)])
    assert rels == sorted(NAMES) == [s.rel for s in list_shards(str(local_tree), "files")]
    entry = next(e for page in walker.pages(Partition(0, "b/", True)) for e in page if e[1] == "b/é.jpg")
    assert entry == (str(local_tree / "b" / "é.jpg"), "b/é.jpg", len("b/é.jpg"))


@pytest.mark.parametrize("entries", [1, 2, 3, 6, 100])
@pytest.mark.parametrize("target", [1, 2, 3, 5, 100])
def test_partitions_cover_every_file_once_whatever_the_split(
    local_tree: Path, target: int, entries: int, monkeypatch
):
    monkeypatch.setattr(walk_module, "EXPLORE_FILES", entries)  # a directory with more files is left whole
    found = explore(Walker(str(local_tree)), target)
    assert sorted(_all_pages(Walker(str(local_tree)), found.partitions)) == sorted(NAMES)
    assert [p.id for p in found.partitions] == list(range(len(found.partitions)))
    assert found.files <= len(NAMES)
    if entries >= 6 and target == 100:  # every directory explored: one partition per directory with files
        assert [(p.prefix, p.recursive) for p in found.partitions] == [
            ("", False),
            ("a/", False),
            ("a/b/", False),
            ("b/", False),
            ("c/d/", False),
            ("c/d/e/", False),
        ]


def test_exploring_a_small_tree_sees_all_of_it(local_tree: Path):
    found = explore(Walker(str(local_tree)), target=100)
    assert found.complete and found.files == len(NAMES)
    assert all(not p.recursive for p in found.partitions)
    assert sorted(rel for _, rel, _ in found.sample) == sorted(NAMES)


def test_a_directory_too_large_to_explore_is_left_to_a_worker(local_tree: Path, monkeypatch):
    monkeypatch.setattr(walk_module, "EXPLORE_FILES", 2)  # the root has 3 files
    found = explore(Walker(str(local_tree)), target=100)
    assert not found.complete and found.partitions == [Partition(0, "", True)]


def test_s3_pages_and_partitions_match_the_local_ones(s3_server: str, s3_bucket: str, monkeypatch):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for name in NAMES + HIDDEN:
        s3.put_object(Bucket=s3_bucket, Key=f"in/{name}", Body=b"x" * len(name))
    s3.put_object(Bucket=s3_bucket, Key="in/dirmarker/", Body=b"")  # a console 'folder'
    s3.put_object(Bucket=s3_bucket, Key="inside.jpg", Body=b"x")  # shares the prefix, not the directory
    uri = f"s3://{s3_bucket}/in"
    walker = Walker(uri)
    rels = _all_pages(walker, [Partition(0, "", recursive=True)])
    assert rels == sorted(NAMES) == [s.rel for s in list_shards(uri, "files")]
    monkeypatch.setattr(walk_module, "EXPLORE_FILES", 1)
    for target in (1, 3, 100):
        found = explore(Walker(uri), target)
        assert sorted(_all_pages(walker, found.partitions)) == sorted(NAMES)
    path, rel, size = next(e for page in walker.pages(Partition(0, "b/", False)) for e in page)
    assert (path, rel, size) == (f"{s3_bucket}/in/b/%41 #1?.jpg", "b/%41 #1?.jpg", len("b/%41 #1?.jpg"))


def test_first_gives_the_first_files_and_says_if_that_is_all(local_tree: Path):
    walker = Walker(str(local_tree))
    entries, complete = walker.first(4)
    assert [rel for _, rel, _ in entries] == sorted(NAMES)[:4] and not complete
    entries, complete = walker.first(100)
    assert len(entries) == len(NAMES) and complete


def test_many_subdirectories_are_split_however_few_files_the_driver_reads(tmp_path: Path, monkeypatch):
    """Hash-prefixed layouts (thousands of directories under the root) are listed in parallel: only a
    directory's files count against the driver's budget, not its subdirectories."""
    monkeypatch.setattr(walk_module, "EXPLORE_FILES", 1)
    names = [f"{i:02x}/{j}.jpg" for i in range(40) for j in range(3)]
    _tree(tmp_path / "in", names)
    found = explore(Walker(str(tmp_path / "in")), target=16)
    assert len(found.partitions) == 40 and all(p.recursive for p in found.partitions)
    assert sorted(_all_pages(Walker(str(tmp_path / "in")), found.partitions)) == sorted(names)


def test_a_flat_s3_prefix_is_split_into_key_ranges_that_cover_every_key_once(
    s3_server: str, s3_bucket: str, monkeypatch
):
    """A flat prefix is listed by many workers: its key range is cut where the names differ (after the
    characters they share, like img_000…), each piece probed with one request."""
    s3 = boto3.client("s3", endpoint_url=s3_server)
    names = [f"img_{i:06d}.jpg" for i in range(0, 400, 3)]  # sequential names share 'img_000'
    names += [f"{i * 7919 % 4096:03x}.jpg" for i in range(60)]  # hash names
    names += ["~tilde.jpg", "é.jpg", "中.jpg", " lead.jpg", "sub/x.jpg", "img_", "img_000120.jpg.txt"]
    for name in [*names, "_hidden.jpg", "sub/.h.jpg"]:
        s3.put_object(Bucket=s3_bucket, Key=f"flat/{name}", Body=b"x")
    s3.put_object(Bucket=s3_bucket, Key="flatter.jpg", Body=b"x")  # shares the prefix, not the directory
    monkeypatch.setattr(walk_module, "PAGE", 8)  # a probe reads 8 keys: a range with more is split
    monkeypatch.setattr(walk_module, "EXPLORE_FILES", 8)  # the root's first page does not hold it all
    monkeypatch.setattr(walk_module, "MIN_SPLIT_PAGES", 2)  # cut ranges of a few pages too
    walker = Walker(f"s3://{s3_bucket}/flat")
    requests = []
    walker._client = boto3.client("s3", endpoint_url=s3_server)
    walker._client.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: requests.append(1))
    for target in (1, 6):
        requests.clear()
        found = explore(walker, target)
        probes = len(requests)
        rels = _all_pages(walker, found.partitions, size=5)
        assert sorted(rels) == sorted(names) and len(rels) == len(names)
        assert [p.id for p in found.partitions] == list(range(len(found.partitions)))
        if target == 1:
            assert found.partitions == [Partition(0, "", True)] and probes == 0
            continue
        # one request per non-empty piece at each cut (62 pieces here, most of them a page or less)
        assert len(found.partitions) >= target and probes <= 100, probes
        sizes = [sum(len(page) for page in walker.pages(p)) for p in found.partitions]
        assert max(sizes) <= len(names) // 4, sizes
    assert found.partitions == explore(walker, target).partitions, "the same ranges every time"
    uppers = [p.upto for p in found.partitions if p.upto is not None]
    assert uppers == sorted(uppers), "partitions in key order: units are formed in listing order"
    # A range of a few pages is listed, not cut: cutting would cost more requests than it saves.
    monkeypatch.setattr(walk_module, "MIN_SPLIT_PAGES", 16)
    requests.clear()
    assert explore(walker, 6).partitions == [Partition(0, "", True)] and len(requests) <= 3  # 1 to decide


def test_the_pages_of_a_range_are_estimated_from_its_first_page():
    hex_names = Partition(0, "", True)  # 16 ** 6 names <6 hex>.jpg: 16,777 pages of 1,000
    page = [f"{i:06x}.jpg" for i in range(1000)]
    assert 16_777 / 2 <= walk_module.estimated_pages(hex_names, page) <= 16_777 * 8
    numbered = Partition(0, "a/", True, after="a/img_0001", upto="a/img_0002")  # img_000100 … img_000199
    page = [f"a/img_0001{i:02d}.jpg" for i in range(10)]
    assert 10 / 2 <= walk_module.estimated_pages(numbered, page) <= 10 * 8
    few = Partition(0, "", True)  # 1,250 hashed names in all: 1.25 pages
    names = sorted(f"{i * 2654435761 % 2**32:08x}.jpg" for i in range(1250))
    assert walk_module.estimated_pages(few, names[:1000]) < walk_module.MIN_SPLIT_PAGES
