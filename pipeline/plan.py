"""Planning: everything a run decides before any worker starts, and what `--dry-run` prints.

`plan(config, lease)` loads the weights once (validating them) while it lists and checks the input, takes
the output's lease (a run; `--dry-run` takes none), reads the output's ledger and decides what is still to do.
Arguments refused here leave the output untouched.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import CPU_BATCH_SIZE, GPU_BATCH_SIZE, ConfigError, JobConfig
from pipeline.decode import DEFAULT_MAX_PIXELS, check_sizes
from pipeline.discover import DiscoverUnits, LargeManifest, PartitionReport, SortedKeys, stream_above
from pipeline.embed import ModelSpec
from pipeline.lease import OutputLease
from pipeline.ledger import Ledger
from pipeline.sink import OutputSpec
from pipeline.sources import Shard, check_parquet_columns, check_unique_keys, list_shards
from pipeline.sources.listing import classify, make_shards
from pipeline.sources.manifest import manifest_files, manifest_head, manifest_shards
from pipeline.sources.parquet import kept_column_types
from pipeline.sources.walk import Entry, Partition, Walker, explore
from pipeline.sources.webdataset import SIDECARS
from pipeline.storage import resolve_uri
from pipeline.units import MAX_FILES_PER_UNIT, Unit

if TYPE_CHECKING:
    from vit.checkpoints import LoadedModel
    from vit.model import ViTConfig


@dataclass
class Plan:
    config: JobConfig
    shards: list[Shard]  # still to do
    skipped_shards: int
    skipped_rows: int
    spec: ModelSpec
    model: ViTConfig  # the loaded model's sizes
    resize_size: int
    num_params: int
    output: OutputSpec
    identity: dict[str, str]  # recorded in the ledger and in every data file's footer
    ledger: Ledger  # the output's ledger as read when planning
    retry: list[Unit] = field(default_factory=list)  # --retry-errors; make_units numbers them
    # A streamed input's listing partitions (pipeline/discover.py); a large manifest's buckets, once sorted.
    partitions: list[Partition | SortedKeys] = field(default_factory=list)
    manifest: LargeManifest | None = None  # a manifest too large for the driver, sorted by workers
    notes: list[str] = field(default_factory=list)

    @property
    def streamed(self) -> bool:
        """True when workers find the input's units (a large listing or manifest), not the driver."""
        return bool(self.partitions) or self.manifest is not None

    @property
    def gmacs(self) -> float:
        """The model's multiply-accumulates per image, in billions."""
        return self.model.gmacs()

    def decode_settings(self) -> dict[str, Any]:
        """The decode stage's arguments (DecodePatches, or GpuDecoder with --decode gpu)."""
        return {
            "image_size": self.model.image_size,
            "patch_size": self.model.patch_size,
            "resize_size": self.resize_size,
            "max_pixels": self.config.max_pixels or DEFAULT_MAX_PIXELS,
            "exact": self.config.preprocess == "exact",
        }

    def describe(self) -> str:
        """What --dry-run prints. A streamed input is listed here, on this process, to count it (its keys
        are counted, not kept)."""
        ident = self.identity
        batch = self.config.batch_size or f"{GPU_BATCH_SIZE} (GPU actors) or {CPU_BATCH_SIZE} (CPU)"
        retry = f"; {sum(len(u.drop) for u in self.retry)} error rows to retry" if self.retry else ""
        if self.manifest is not None:
            n = len(self.manifest.files)
            work = (
                f"more than {stream_above():,} files named by --input-list; its {n} data "
                f"file{'s' if n != 1 else ''} are read, sorted into {self.manifest.buckets} buckets and "
                f"checked against the output by workers when the job runs{retry}"
            )
        elif self.partitions:
            reports: list[PartitionReport] = []
            discover = DiscoverUnits(
                self.config.input, MAX_FILES_PER_UNIT, self.ledger.shards(), report=reports.append
            )
            for partition in self.partitions:
                for _ in discover.units(partition):
                    pass
            todo, skipped = sum(r.shards for r in reports), sum(r.skipped_shards for r in reports)
            kinds = f"file; listed by workers in {len(self.partitions)} partitions"
            work = f"{todo} shards to do: {kinds}; {skipped} already done{retry}"
        else:
            kinds = ", ".join(sorted({s.kind for s in self.shards}) or ["(nothing new)"])
            work = f"{len(self.shards)} shards to do: {kinds}; {self.skipped_shards} already done{retry}"
        return "\n".join(
            [
                f"input:   {self.config.input} ({work})",
                f"output:  {self.config.output}",
                f"model:   {ident['model']} weights={ident['weights']} sha256={ident['weights_sha256'][:16]}",
                f"         embedding[{self.output.embedding_dim}] {self.output.embedding_dtype}, "
                f"logits[{self.output.num_classes}] {self.output.logits_dtype}",
                f"preproc: {ident['preprocessing']}",
                f"batch:   {batch} images per model call",
            ]
        )


def project_version() -> str:
    try:
        return importlib_metadata.version("vit-embed")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def model_spec(config: JobConfig) -> ModelSpec:
    """The model part of the config; ModelSpec's other fields have JobConfig's names."""
    names = {f.name for f in dataclasses.fields(ModelSpec)} - {"preset"}
    return ModelSpec(preset=config.model, **{name: getattr(config, name) for name in names})


def preprocessing_text(preprocess: str, resize_size: int, image_size: int) -> str:
    """What `--preprocess` does to each image, in words (recorded in the identity: runs with other words
    never share an output)."""
    if preprocess == "exact":
        return (
            f"RGB (EXIF orientation applied, alpha composited on white); torchvision's PIL path: Pillow "
            f"decode, Resize({resize_size}, bilinear, antialias), CenterCrop({image_size}); uint8 patches "
            f"(kh, kw, c); normalize (x/255 - mean) / std"
        )
    return (
        f"RGB (EXIF orientation applied, alpha composited on white); torchvision ViT resize: "
        f"shorter side to {resize_size}, bilinear antialias (JPEG: DCT-domain downscale + OpenCV "
        f"resample of the crop window, >= 30 dB PSNR vs torchvision), centre crop {image_size}; "
        f"uint8 patches (kh, kw, c); normalize (x/255 - mean) / std"
    )


def identity(config: JobConfig, loaded: LoadedModel, resize_size: int, output: OutputSpec) -> dict[str, str]:
    """What makes rows comparable: model, weights, preprocessing, the output's columns (pipeline/ledger.py
    compares it between runs into one output); also the footer metadata of every data file."""
    mc = loaded.model.config
    ident = {k: v for k, v in loaded.identity().items() if k not in ("preset", "sha256")}
    ident.update(
        {
            "model": config.model,
            "weights": config.weights,
            "weights_sha256": loaded.sha256 or "random",
            "seed": str(config.seed) if loaded.sha256 is None else "",  # random weights depend on it
            "image_size": str(mc.image_size),
            "patch_size": str(mc.patch_size),
            "resize_size": str(resize_size),
            "preprocess": config.preprocess,
            "preprocessing": preprocessing_text(config.preprocess, resize_size, mc.image_size),
            "embedding": "CLS token after the final LayerNorm",
            "embedding_dtype": config.embedding_dtype,
            "logits_dtype": config.logits_dtype,
            "decode": "JPEG on the model's device (nvJPEG on GPUs), others on CPU"
            if config.decode == "gpu"
            else "CPU (libjpeg-turbo for JPEG, Pillow for other formats)",
            "version": project_version(),
        }
    )
    from vit.checkpoints import IMAGENET_1K

    if loaded.class_names:
        # The shipped ImageNet-1k names by name (the rows' top_names hold them), others in full.
        shipped = loaded.class_names_source == IMAGENET_1K
        ident["class_names"] = IMAGENET_1K if shipped else json.dumps(loaded.class_names)
    ident["columns"] = output.columns()
    ident.update(config.extra)
    return ident


def output_spec(config: JobConfig, loaded: LoadedModel, shards: list[Shard], streamed: bool) -> OutputSpec:
    """The output's columns: the model's, and those passed through from the input (a tar sample's
    sidecars; a Parquet input's --keep-columns, typed as in its first file)."""
    mc = loaded.model.config
    kinds = {s.kind for s in shards}
    extra: tuple[tuple[str, Any], ...] = ()
    if config.keep_columns:
        parquet = [s for s in shards if s.kind == "parquet"]
        if streamed or not parquet:
            raise ConfigError(
                "--keep-columns passes columns of Parquet inputs through, and this input has no Parquet "
                "files (a webdataset input's json, txt and cls sidecars are kept without it)."
            )
        extra = kept_column_types(config.input, parquet[0], config.keep_columns)
    elif "webdataset" in kinds:
        extra = SIDECARS
    return OutputSpec(
        mc.hidden_dim,
        mc.num_classes,
        config.embedding_dtype,
        config.logits_dtype,
        logits=config.logits == "full",
        topk=config.topk,
        class_names=tuple(loaded.class_names) if loaded.class_names else None,
        extra=extra,
    )


def plan(config: JobConfig, lease: OutputLease | None = None) -> Plan:
    """Validates the arguments, weights and input, then takes `lease` and reads the output's ledger."""
    spec = model_spec(config)
    # The weights are loaded (validating them, once, before any worker starts) in a thread while this one
    # lists the input: torch's import alone takes seconds. A weights error is still reported first.
    with ThreadPoolExecutor(1, thread_name_prefix="load-weights") as pool:
        loading = pool.submit(spec.load)
        try:
            partitions, shards, manifest = _list_input(config)
            listing_error = None
        except Exception as e:
            listing_error = e
        loaded = loading.result()
    if listing_error is not None:
        raise listing_error
    mc = loaded.model.config
    resize_size = check_sizes(mc.image_size, mc.patch_size, None)  # the decode stage's default

    output = output_spec(config, loaded, shards, bool(partitions) or manifest is not None)
    ident = identity(config, loaded, resize_size, output)
    if lease is not None:
        lease.acquire()
    ledger = Ledger.read(config.output)
    ledger.check_identity(ident)
    done, done_rows = ledger.done_in([s.rel for s in shards])  # the listing is sorted by rel
    todo = [s for s, d in zip(shards, done, strict=True) if not d]
    if config.key_column is not None and config.key_column != config.image_column:
        check_unique_keys(
            config.input, [s for s in todo if s.kind == "parquet"], config.key_column, committed_keys(ledger)
        )
    skipped = [s for s, d in zip(shards, done, strict=True) if d]
    result = Plan(
        config=config,
        shards=todo,
        skipped_shards=len(skipped),
        skipped_rows=int(done_rows.sum()),
        spec=spec,
        model=mc,
        resize_size=resize_size,
        num_params=sum(p.numel() for p in loaded.model.parameters()),
        output=output,
        identity=ident,
        ledger=ledger,
        partitions=list(partitions),
        manifest=manifest,
    )
    if config.retry_errors:
        done_shards = {s.rel: s for s in skipped}

        def find(rels: list[str]) -> dict[str, Shard]:  # never listed whole on the driver when streamed
            return stat_shards(config.input, rels) if result.streamed else done_shards

        result.retry, result.notes = retry_units(ledger, find)
    return result


def _list_input(config: JobConfig) -> tuple[list[Partition], list[Shard], LargeManifest | None]:
    """The input's listing partitions when it is streamed, a large manifest's files, or else its shards,
    listed (or read from the manifest) on the driver; a Parquet input's image and key columns are checked
    on one file's schema."""
    if config.input_list is not None:
        manifest, shards = manifest_input(config)
        partitions: list[Partition] = []
    else:
        manifest = None
        partitions, listed = streamed_partitions(config)
        if partitions:
            shards = []
        elif listed:  # the driver listed the whole input to see that it is small
            shards = make_shards(config.input, listed, config.format)
        else:
            shards = list_shards(config.input, config.format)
    parquet = [s for s in shards if s.kind == "parquet"]
    if parquet:
        check_parquet_columns(config.input, parquet[0], config.image_column, config.key_column)
    return partitions, shards, manifest


def manifest_input(config: JobConfig) -> tuple[LargeManifest | None, list[Shard]]:
    """A manifest of up to `stream_above()` keys is read here, into shards. A larger one naming loose files
    is left to workers (LargeManifest): the driver reads only its first keys, which are checked (refusals,
    kinds) as the whole manifest would be. One of tar or Parquet shards is read here whatever its size."""
    assert config.input_list is not None
    files = manifest_files(config.input, config.input_list)
    entries, complete = manifest_head(config.input, config.input_list, stream_above(), files)
    loose = config.format == "files" or (
        config.format == "auto" and all(classify(rel) == "file" for _, rel, _ in entries)
    )
    if not complete and loose:
        return LargeManifest.of(files), []
    if not complete:
        entries, _ = manifest_head(config.input, config.input_list, None, files)
    return None, manifest_shards(config.input, config.input_list, entries, config.format)


def streamed_partitions(config: JobConfig) -> tuple[list[Partition], list[Entry] | None]:
    """The listing partitions of an input of more than `stream_above()` loose files, which the discover
    stage lists in workers (pipeline/discover.py); none for an input the driver lists itself: fewer files,
    tar or Parquet shards, a manifest, a single file, or one that cannot be listed (list_shards says why).

    The driver explores the input's directories; when that does not see all of it, it lists the input's
    first `stream_above()` files (in name order) to tell a small input from a large one, and returns them
    when they are all of it."""
    if config.input_list is not None or config.format not in ("auto", "files"):
        return [], None
    limit = stream_above()
    listed = None
    try:
        walker = Walker(config.input)
        found = explore(walker)
        sample, small = found.sample, found.complete and found.files <= limit
        if small:  # the exploration listed every file, and its partitions carry them
            listed = [entry for p in found.partitions for entry in p.files or ()]
        if not found.complete and limit > 0:
            first, small = walker.first(limit)
            sample = first[: len(sample)] or sample
            listed = first if small else None
    except Exception as e:  # not a directory, missing, denied: list_shards words the error
        if not _listing_error(e):
            raise  # a bug in exploring, not a fact about the input: never hidden behind a slower path
        return [], None
    if small:
        return [], listed
    if config.format == "auto" and any(classify(rel) != "file" for _, rel, _ in sample):
        return [], None  # tar or Parquet shards, or a mix that list_shards refuses
    return found.partitions, None


def _listing_error(e: Exception) -> bool:
    """True for what listing an input raises when the input is not there or cannot be read (the file
    system's, S3's and URI errors)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(e, (OSError, ValueError, BotoCoreError, ClientError))


def stat_shards(input_uri: str, rels: list[str]) -> dict[str, Shard]:
    """Loose files of the input by name, those that still exist (one request each on S3): the shards of
    --retry-errors when the input is streamed, hence never listed whole on the driver."""
    fs, root = resolve_uri(input_uri)
    infos = fs.get_file_info([f"{root}/{rel}" for rel in rels]) if rels else []
    return {
        rel: Shard(path=info.path, rel=rel, kind="file", size=int(info.size or 0))
        for rel, info in zip(rels, infos, strict=True)
        if info.type == pafs.FileType.File
    }


def error_keys(ledger: Ledger, file: str) -> list[str]:
    """The keys of a committed data file's error rows."""
    fs, root = resolve_uri(ledger.output)
    table = pq.read_table(f"{root}/{file}", columns=["key", "error"], filesystem=fs)
    return [k for k, e in zip(table["key"].to_pylist(), table["error"].to_pylist()) if e is not None]


def committed_keys(ledger: Ledger) -> set[str]:
    """Every key in the output's committed data files (read from their `key` column only): a
    --key-column value already there must not come again."""
    fs, root = resolve_uri(ledger.output)
    keys: set[str] = set()
    for file in ledger.files:
        keys.update(pq.read_table(f"{root}/{file}", columns=["key"], filesystem=fs)["key"].to_pylist())
    return keys


def retry_units(
    ledger: Ledger, find: Callable[[list[str]], dict[str, Shard]]
) -> tuple[list[Unit], list[str]]:
    """--retry-errors: one unit per committed data file holding error rows. It re-reads only the error
    rows' keys (a shard's `#.error` row: the whole shard) and replaces them in that file. `find` gives the
    shards of those names still under the input. Returns the units (numbered by make_units) and notes for
    the summary."""
    wanted: list[tuple[str, dict[str, list[str]]]] = []
    for file, entry in sorted(ledger.files.items()):
        if not entry.errors:
            continue  # the ledger counts each file's error rows: no need to open it
        keys = error_keys(ledger, file)
        # A tar or Parquet shard is a unit alone; loose files share a unit, and a row's key is its path.
        if keys:
            wanted.append((file, {entry.first_shard: keys} if entry.shards == 1 else {k: [k] for k in keys}))
    listed = find(sorted({rel for _, targets in wanted for rel in targets}))
    units, gone = [], 0
    for file, targets in wanted:
        shards = tuple(
            dataclasses.replace(listed[rel], keys=tuple(ks)) for rel, ks in targets.items() if rel in listed
        )
        gone += sum(len(ks) for rel, ks in targets.items() if rel not in listed)
        if shards:
            drop = tuple(k for s in shards for k in (s.keys or ()))
            units.append(Unit(-1, shards, replaces=file, drop=drop))
    notes = (
        [f"{gone} error rows are of inputs no longer under --input; they were left as they are."]
        if gone
        else []
    )
    return units, notes
