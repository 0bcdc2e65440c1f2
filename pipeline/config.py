"""The one configuration object of a run, validated before anything starts."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

FORMATS = ("auto", "files", "webdataset", "parquet")
DTYPES = ("float32", "float16")
DEFAULT_MAX_ERROR_RATE = 0.05
# Images per model call unless --batch-size says otherwise: a GPU wants large batches (256 keeps ViT-H/14
# well inside a 16 GB card); on CPUs larger batches gain nothing.
GPU_BATCH_SIZE = 256
CPU_BATCH_SIZE = 64
DEFAULT_MAX_OBJECT_BYTES = 64 * 2**20  # a larger loose file, tar member or Parquet value is an error row
DEFAULT_TOPK = 5
# Columns the job writes itself (pipeline/sink.py, and the sidecars of webdataset inputs): --keep-columns
# cannot pass an input column of the same name through.
OWN_COLUMNS = (
    "key",
    "embedding",
    "logits",
    "top_classes",
    "top_scores",
    "top_names",
    "width",
    "height",
    "bytes_sha256",
    "run_id",
    "error",
    "json",
    "txt",
    "cls",
)


class ConfigError(ValueError):
    """A bad argument: the message is one sentence saying which option and what is accepted."""


@dataclass(frozen=True)
class JobConfig:
    """Everything `pipeline.run.run` needs. `jobs/embed.py` builds one from the command line."""

    input: str
    output: str
    input_list: str | None = None  # a manifest naming the objects to read instead of listing --input
    model: str = "vit_b_16"
    weights: str = "random"
    format: str = "auto"
    image_column: str = "image"
    key_column: str | None = None
    image_size: int | None = None  # None: the preset's size
    batch_size: int | None = None  # None: GPU_BATCH_SIZE on GPU actors, CPU_BATCH_SIZE on CPU
    embedding_dtype: str = "float32"
    logits_dtype: str = "float32"
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    dry_run: bool = False
    seed: int = 0
    class_names: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    max_pixels: int | None = None  # None: pipeline.decode.DEFAULT_MAX_PIXELS
    num_actors: int | None = None  # None: one per GPU, or one CPU actor when the cluster has no GPU
    actor_cpus: float | None = None  # CPUs per CPU actor (None: half the smallest node's, at least 1)
    device: str = "auto"  # auto | cuda | cpu
    compile: bool = False
    decode: str = "cpu"  # cpu: decode in CPU tasks; gpu: JPEGs decoded in the model actor (nvJPEG on GPU)
    commit_interval_s: float = 10.0  # how often complete units are committed while the run goes on
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES  # larger objects become error rows, unread
    retry_errors: bool = False  # re-read and re-embed the inputs whose committed rows are errors
    topk: int = DEFAULT_TOPK  # the most probable classes written per row (0: none)
    logits: str = "full"  # full: write the logits vector; none: only the top-k columns
    keep_columns: tuple[str, ...] = ()  # Parquet inputs: columns passed through to the output
    preprocess: str = "fast"  # fast: libjpeg-turbo DCT scaling + OpenCV; exact: torchvision's PIL path
    extra: dict[str, str] = field(default_factory=dict)  # free-form metadata recorded in the footer

    def __post_init__(self) -> None:
        taken = sorted(set(self.keep_columns) & set(OWN_COLUMNS))
        checks = [
            (bool(self.input), "--input is required: a local directory or s3://bucket/prefix."),
            (bool(self.output), "--output is required: a local directory or s3://bucket/prefix."),
            (
                self.input_list is None or _is_location(self.input_list),
                "--input-list must be a local path or an s3://bucket/key URI of a manifest (Parquet, CSV "
                f"or an S3 Inventory manifest.json), not {self.input_list!r}.",
            ),
            (
                self.input_list is None or not _overlap(self.input_list, self.output),
                "--input-list must be outside --output, which holds only what the job writes.",
            ),
            (self.format in FORMATS, f"--format must be one of {', '.join(FORMATS)}, not {self.format!r}."),
            (
                self.batch_size is None or self.batch_size >= 1,
                f"--batch-size must be at least 1, not {self.batch_size}.",
            ),
            (
                self.embedding_dtype in DTYPES,
                f"--embedding-dtype must be float32 or float16, not {self.embedding_dtype!r}.",
            ),
            (
                self.logits_dtype in DTYPES,
                f"--logits-dtype must be float32 or float16, not {self.logits_dtype!r}.",
            ),
            (
                0.0 <= self.max_error_rate <= 1.0,
                f"--max-error-rate is a fraction between 0 and 1, not {self.max_error_rate}.",
            ),
            (
                self.image_size is None or self.image_size >= 1,
                f"--image-size must be positive, not {self.image_size}.",
            ),
            (
                self.num_actors is None or self.num_actors >= 1,
                f"--num-actors must be at least 1, not {self.num_actors}.",
            ),
            (
                self.actor_cpus is None or (math.isfinite(self.actor_cpus) and self.actor_cpus > 0),
                f"--actor-cpus must be a positive number of CPUs, not {self.actor_cpus}.",
            ),
            (
                self.max_object_bytes >= 1,
                f"--max-object-bytes must be at least 1, not {self.max_object_bytes}.",
            ),
            (
                0 <= self.commit_interval_s < math.inf,
                f"--commit-interval is a number of seconds, 0 or more, not {self.commit_interval_s}.",
            ),
            (self.topk >= 0, f"--topk is a number of classes, 0 or more, not {self.topk}."),
            (self.logits in ("full", "none"), f"--logits must be full or none, not {self.logits!r}."),
            (
                self.preprocess in ("fast", "exact"),
                f"--preprocess must be fast or exact, not {self.preprocess!r}.",
            ),
            (
                not (self.preprocess == "exact" and self.decode == "gpu"),
                "--preprocess exact decodes with Pillow on CPUs, as torchvision does: it cannot be combined "
                "with --decode gpu (leave one of them out).",
            ),
            (
                len(set(self.keep_columns)) == len(self.keep_columns) and all(self.keep_columns),
                "--keep-columns names each column once, comma-separated, not "
                f"{','.join(self.keep_columns)!r}.",
            ),
            (
                not taken,
                f"--keep-columns cannot keep {', '.join(taken)}: the output has columns of those names of "
                f"its own ({', '.join(OWN_COLUMNS)}).",
            ),
            (
                not {self.image_column, self.key_column} & set(self.keep_columns),
                "--keep-columns cannot keep the --image-column or --key-column: the output already holds "
                "them as the embedding and the key.",
            ),
            _check_triple("--mean", self.mean, positive=False),
            _check_triple("--std", self.std, positive=True),
            (
                self.device in ("auto", "cuda", "cpu"),
                f"--device must be auto, cuda or cpu, not {self.device!r}.",
            ),
            (
                not _overlap(self.input, self.output),
                "--output must be outside --input (and --input outside --output): the job never writes "
                "into its input, and a later run would read its own output as images.",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        # Workers resolve paths in their own working directory, which on a cluster is not the driver's.
        for name in ("input", "output", "input_list", "weights"):
            value = getattr(self, name)
            if value is not None and value != "random":
                object.__setattr__(self, name, _absolute(value))


def _absolute(location: str) -> str:
    """A local path made absolute here, in the driver; s3:// and file:// URIs unchanged."""
    if location.strip().lower().startswith(("s3://", "file://")):
        return location
    return os.path.abspath(os.path.expanduser(location.strip()))


def _check_triple(option: str, values: tuple[float, ...] | None, *, positive: bool) -> tuple[bool, str]:
    """(ok, message) for --mean / --std: three finite numbers (R, G, B), all above 0 for --std."""
    if values is None:
        return True, ""
    shown = ",".join(f"{v:g}" for v in values)
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        return False, f"{option} must be three finite numbers (R,G,B), e.g. 0.5,0.5,0.5, not {shown}."
    if positive and not all(v > 0 for v in values):
        return False, f"{option} must be above 0 for every channel (it divides the pixels), not {shown}."
    return True, ""


def _is_location(uri: str) -> bool:
    """A non-empty local path, file:// URI or s3://bucket/… URI: what pipeline.storage.resolve_uri takes."""
    text = uri.strip() if isinstance(uri, str) else ""
    if not text:
        return False
    if "://" not in text:
        return True
    scheme, rest = text.split("://", 1)
    return scheme.lower() == "file" or (scheme.lower() == "s3" and bool(rest.split("/", 1)[0]))


def _overlap(a: str, b: str) -> bool:
    """True when one location is the other or lies inside it.

    Local paths are compared after resolving symlinks, so an output that is a symlink into the input (or
    an input reached through a symlink into the output) counts as inside it. S3 URIs are compared as bucket
    and literal key, as pipeline.storage splits them.
    """
    from pipeline.storage import InputError, is_s3, local_path, split_s3_uri

    def norm(u: str) -> str:
        try:
            if is_s3(u):
                bucket, key = split_s3_uri(u.strip())
                return f"s3://{bucket}/{key}/" if key else f"s3://{bucket}/"
            if "://" in u and not u.strip().lower().startswith("file://"):
                return u.strip().rstrip("/") + "/"  # not a location this job reads: resolve_uri refuses it
            return os.path.realpath(local_path(u)).rstrip("/") + "/"
        except InputError:
            return u.strip().rstrip("/") + "/"

    if not a or not b:
        return False
    na, nb = norm(a), norm(b)
    return na.startswith(nb) or nb.startswith(na)
