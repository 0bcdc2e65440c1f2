"""The read stage: resolve an input URI, list its shards, read them into one row per image.

Inputs (``--input``: a local directory, a ``file://`` URI or ``s3://bucket/prefix``; one object works too):

- loose image files: every object under the prefix; key = path relative to the input root.
- webdataset ``.tar`` shards: members grouped by sample key (member path up to the first ``.`` of its
  basename); the image is the first existing extension of :data:`IMAGE_EXTENSIONS`;
  key = ``<shard rel>#<sample key>``.
- Parquet files with an image-bytes column (binary, or a struct with a ``bytes`` field);
  key = ``<file rel>#<row index>``, or ``str(value)`` of ``key_column`` when given.

Listing ignores paths with a component starting with ``_`` or ``.``; ``format="auto"`` decides by
extension. With a manifest (``--input-list``: Parquet, CSV or an S3 Inventory manifest.json) the objects
it names are the input instead of a listing (:mod:`pipeline.sources.manifest`). Reading never raises for
a bad input: a problem is a row whose ``error`` starts with ``"read: "``, and a problem with a whole
container is one row keyed ``<shard rel>#.error`` (:data:`SHARD_ERROR_SUFFIX`). A :class:`Shard` whose
``keys`` is set yields only those rows (a retry).
"""

from pipeline.config import FORMATS
from pipeline.rows import SHARD_ERROR_SUFFIX
from pipeline.sources.base import STREAM_BUFFER_BYTES, Row
from pipeline.sources.listing import (
    PARQUET_SUFFIXES,
    TAR_SUFFIXES,
    Shard,
    list_shards,
    make_shards,
    shards_to_items,
)
from pipeline.sources.manifest import list_manifest, manifest_pages
from pipeline.sources.parquet import check_parquet_columns, check_unique_keys, parquet_columns_problem
from pipeline.sources.read import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_PENDING_BYTES,
    OUTPUT_COLUMNS,
    ReadShards,
)
from pipeline.sources.webdataset import IMAGE_EXTENSIONS
from pipeline.storage import InputError, is_s3, resolve_uri

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_PENDING_BYTES",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "OUTPUT_COLUMNS",
    "PARQUET_SUFFIXES",
    "SHARD_ERROR_SUFFIX",
    "STREAM_BUFFER_BYTES",
    "TAR_SUFFIXES",
    "InputError",
    "ReadShards",
    "Row",
    "Shard",
    "check_parquet_columns",
    "check_unique_keys",
    "is_s3",
    "list_manifest",
    "list_shards",
    "make_shards",
    "manifest_pages",
    "parquet_columns_problem",
    "resolve_uri",
    "shards_to_items",
]
