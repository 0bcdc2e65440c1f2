"""Webdataset tar shards: members grouped by sample key, one row per sample, read in one streaming pass.

A sample with its top-preference (``.jpg``) member is emitted when the next sample's first member is read
(webdataset writes a sample's members together), so that its sidecars (``.json``, ``.txt``, ``.cls``) that
follow the image are in its row; other samples are held (their image bytes and sidecars only) until the
end of the shard, or until ``max_pending_bytes`` is exceeded, when the held samples that have an image are
emitted early. Members of a sample that arrive after it was emitted are skipped.

Sidecars become the output columns SIDECARS: ``json`` and ``txt`` as the member's text (UTF-8; invalid
bytes replaced), ``cls`` as an integer (null when the text is not one); null when the sample has no such
member or it is over ``--max-object-bytes``.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.rows import SHARD_ERROR_SUFFIX, pack_extra
from pipeline.sources.base import STREAM_BUFFER_BYTES, Row, Settings, too_big
from pipeline.sources.listing import Shard, wanted_keys
from pipeline.storage import describe as _describe

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")  # tar member preference order
_IMAGE_RANK = {ext: rank for rank, ext in enumerate(IMAGE_EXTENSIONS)}
# The output columns of a tar sample's sidecar members, by member extension (lower case).
SIDECARS: tuple[tuple[str, pa.DataType], ...] = (
    ("json", pa.string()),
    ("txt", pa.string()),
    ("cls", pa.int64()),
)
_SIDECAR_EXTS = frozenset(name for name, _ in SIDECARS)


@dataclass
class _Sample:
    """A tar sample being assembled: extensions seen, and its best image member so far."""

    exts: list[str] = field(default_factory=list)
    rank: int = len(IMAGE_EXTENSIONS)  # preference rank of the chosen image member; len() = none yet
    data: bytes | None = None
    error: str | None = None
    sidecars: dict[str, bytes] = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return self.rank < len(IMAGE_EXTENSIONS)

    @property
    def size(self) -> int:
        """Bytes held: the image's and the sidecars'."""
        return len(self.data or b"") + sum(len(v) for v in self.sidecars.values())

    def extra(self) -> bytes:
        """The sidecar columns' values (SIDECARS), packed for the output."""
        values: list[Any] = []
        for name, _ in SIDECARS:
            raw = self.sidecars.get(name)
            text = None if raw is None else raw.decode("utf-8", errors="replace")
            if name == "cls" and text is not None:
                try:
                    values.append(int(text.strip()))
                except ValueError:
                    values.append(None)
            else:
                values.append(text)
        return pack_extra(values)


@dataclass
class _TarNotes:
    """What tarfile skipped or could not read in one pass (filled by _tarinfo_class's hook)."""

    zero_blocks: int = 0
    bad_blocks: int = 0
    first_bad_offset: int = -1
    truncated_header_at: int = -1
    problems: list[str] = field(default_factory=list)


# tarfile's header exceptions: in CPython since 3.2, though not in its docs (nor typeshed).
_EOF_HEADER: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_INVALID_HEADER: type[Exception] = tarfile.InvalidHeaderError  # type: ignore[attr-defined]
_TRUNCATED_HEADER: type[Exception] = tarfile.TruncatedHeaderError  # type: ignore[attr-defined]


def _tarinfo_class(notes: _TarNotes) -> type[tarfile.TarInfo]:
    """A TarInfo subclass that records the header blocks tarfile skips with ``ignore_zeros=True``."""

    class _Info(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
            try:
                return super().fromtarfile(tf)
            except _EOF_HEADER:
                notes.zero_blocks += 1
                raise
            except _INVALID_HEADER:
                notes.bad_blocks += 1
                if notes.first_bad_offset < 0:
                    notes.first_bad_offset = tf.offset
                raise
            except _TRUNCATED_HEADER:
                notes.truncated_header_at = tf.offset
                raise

    return _Info


def _sample_key(name: str) -> tuple[str, str] | None:
    """webdataset's split: ``dir/base.ext.more`` → (``dir/base``, ``ext.more``); None for non-sample names."""
    while name.startswith("./"):
        name = name[2:]
    dirname, _, base = name.rpartition("/")
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{dirname}/{stem}" if dirname else stem), ext


def read_tar(settings: Settings, shard: Shard) -> Iterator[Row]:
    """The rows of a tar shard; a transient failure re-streams it and skips the samples already emitted."""
    done: set[str] = set()  # sample keys already emitted, across passes
    try:
        yield from settings.retrying(shard.rel, lambda last: _tar_pass(settings, shard, done, salvage=last))
    except Exception as e:
        what = "could not be opened" if not done else "could not be read to the end"
        yield shard.rel + SHARD_ERROR_SUFFIX, None, f"read: tar shard {what}: {_describe(e)}"


def _tar_pass(settings: Settings, shard: Shard, done: set[str], salvage: bool) -> Iterator[Row]:
    """One streaming pass over a tar shard; rows of samples in ``done`` are not emitted again.

    Samples are held in ``pending`` (first-seen order) until no preferable image member can follow.
    ``salvage`` (the last attempt): on a failure, emit the held samples that have an image, then re-raise.
    """
    pending: dict[str, _Sample] = {}
    try:
        yield from _tar_stream(settings, shard, done, pending)
    except Exception:
        if salvage:
            for key in [k for k, s in pending.items() if s.has_image]:
                yield _emit(shard, done, key, pending.pop(key))
        raise


def _tar_stream(
    settings: Settings, shard: Shard, done: set[str], pending: dict[str, _Sample]
) -> Iterator[Row]:
    notes = _TarNotes()
    pending_bytes = 0
    current: str | None = None  # the sample whose members are being read
    wanted = wanted_keys(shard)
    with settings.fs.open_input_stream(shard.path, compression=None, buffer_size=STREAM_BUFFER_BYTES) as raw:
        try:
            tf = tarfile.open(  # noqa: SIM115 (closed by the `with tf` below)
                fileobj=raw,  # type: ignore[arg-type]
                mode="r|",
                ignore_zeros=True,  # skip damaged header blocks and resynchronise on the next member
                tarinfo=_tarinfo_class(notes),
            )
        except tarfile.ReadError as e:
            yield shard.rel + SHARD_ERROR_SUFFIX, None, f"read: not a readable tar archive ({e})"
            return
        with tf:
            try:
                for member in tf:
                    tf.members.clear()  # type: ignore[attr-defined]  # stream mode would otherwise keep every header in memory
                    split = _sample_key(member.name) if member.isfile() else None
                    if split is None or split[0] in done:
                        continue  # dirs, links, names without extension, late members of emitted samples
                    if wanted is not None and f"{shard.rel}#{split[0]}" not in wanted:
                        continue  # a retry of other samples
                    key, ext = split
                    if key != current:  # the previous sample's members are all read
                        held = pending.get(current) if current is not None else None
                        if held is not None and held.rank == 0:  # nothing can be preferred to its image
                            pending_bytes -= held.size
                            yield _emit(shard, done, current, pending.pop(current))  # type: ignore[arg-type]
                        current = key
                    sample = pending.setdefault(key, _Sample())
                    sample.exts.append(ext)
                    if ext.lower() in _SIDECAR_EXTS and member.size <= settings.max_image_bytes:
                        try:
                            sample.sidecars[ext.lower()] = tf.extractfile(member).read()  # type: ignore[union-attr]
                            pending_bytes += member.size
                        except tarfile.ReadError as e:  # the archive ends inside this member
                            notes.problems.append(
                                f"the archive ends early, inside member {member.name!r} ({e})"
                            )
                            break
                        continue
                    rank = _IMAGE_RANK.get(ext.lower())
                    if rank is None or rank >= sample.rank:
                        continue
                    pending_bytes -= len(sample.data or b"")
                    sample.rank, sample.data, sample.error = rank, None, None
                    if member.size > settings.max_image_bytes:
                        sample.error = too_big(settings, f"tar member {member.name!r}", member.size)
                    else:
                        try:
                            sample.data = tf.extractfile(member).read()  # type: ignore[union-attr]
                            pending_bytes += len(sample.data)
                        except tarfile.ReadError as e:  # the archive ends inside this member
                            sample.error = f"read: tar member {member.name!r} is truncated ({e})"
                            notes.problems.append(f"the archive ends inside member {member.name!r}")
                            break
                    if pending_bytes > settings.max_pending_bytes:  # exactness yields to bounded memory
                        for k in [k for k, s in pending.items() if s.has_image]:
                            yield _emit(shard, done, k, pending.pop(k))
                        pending_bytes = 0
            except tarfile.ReadError as e:  # the archive ends inside a member that was skipped
                notes.problems.append(f"the archive ends early ({e})")
            end = tf.fileobj.tell() if tf.fileobj is not None else -1
    for key in list(pending):
        yield _emit(shard, done, key, pending.pop(key))
    problem = _tar_problem(notes, end)
    if problem:
        yield shard.rel + SHARD_ERROR_SUFFIX, None, f"read: tar shard is damaged: {problem}"


def _emit(shard: Shard, done: set[str], key: str, sample: _Sample) -> Row:
    """The row of a finished tar sample; marks it done."""
    done.add(key)
    if sample.has_image:
        return f"{shard.rel}#{key}", sample.data, sample.error, sample.extra()
    found = ", ".join(dict.fromkeys(e.lower() for e in sample.exts))
    return (
        f"{shard.rel}#{key}",
        None,
        f"read: tar sample has no image member (found: {found})",
        sample.extra(),
    )


def _tar_problem(notes: _TarNotes, end: int) -> str | None:
    problems = list(notes.problems)
    if notes.bad_blocks:
        problems.append(
            f"skipped {notes.bad_blocks} unreadable 512-byte header block(s) from byte "
            f"{notes.first_bad_offset}; members stored there are lost"
        )
    if notes.truncated_header_at >= 0:
        problems.append(f"the archive is cut inside a header at byte {notes.truncated_header_at}")
    elif not notes.problems and not notes.bad_blocks and notes.zero_blocks == 0:
        problems.append(f"no end-of-archive marker after byte {end}: the file looks truncated")
    return "; ".join(problems) or None
