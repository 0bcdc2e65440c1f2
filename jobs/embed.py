"""Embed and classify every image under --input with a Vision Transformer; write Parquet to --output.

    python jobs/embed.py --input s3://bucket/images --output s3://bucket/embeddings --model vit_b_16 \\
        --weights s3://bucket/models/vit_b_16.pth
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/embed.py …   # on a cluster
    python jobs/embed.py --demo       # a generated sample, a small model, local Ray and local output

The last line on stdout is one JSON object with the run's counts; the exit status is 0 when the run
finished within --max-error-rate, 1 when it finished with too many error rows, 2 when it could not run
(one sentence on stderr says why), 3 when it stopped while running (SIGINT, SIGTERM, the cluster went
away): what was committed stays, and the same command does the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

_LOADED = time.monotonic()  # before the project's imports: the summary reports what they took
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python jobs/embed.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

from pipeline.config import (  # noqa: E402
    CPU_BATCH_SIZE,
    DEFAULT_MAX_ERROR_RATE,
    DEFAULT_MAX_OBJECT_BYTES,
    DEFAULT_TOPK,
    FORMATS,
    GPU_BATCH_SIZE,
    ConfigError,
    JobConfig,
)
from pipeline.stop import RERUN, ClusterWatch, Stopped, end_after_stop, install_signal_handlers  # noqa: E402

DEMO_INPUT = "data/sample"
DEMO_OUTPUT = "out/demo"


def _triple(text: str) -> tuple[float, ...]:
    """Comma-separated numbers; JobConfig checks that there are three and that they make sense."""
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    """Comma-separated column names."""
    return tuple(name.strip() for name in text.split(","))


def version_text() -> str:
    """The project's version and the torch, CUDA and Ray it runs with (imports the project, torch and Ray)."""
    import ray
    import torch

    from pipeline.plan import project_version

    if torch.version.cuda is None:
        cuda = "none (a CPU build of torch)"
    else:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        cuda = f"{torch.version.cuda}, {gpus} GPU(s) visible"
    return f"vit-embed {project_version()}\ntorch {torch.__version__}\nCUDA {cuda}\nray {ray.__version__}"


class _PrintVersions(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(version_text())
        parser.exit(0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="jobs/embed.py",
        description="Embed and classify images with a Vision Transformer on Ray; write Parquet.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input", help="local directory or s3://bucket/prefix holding the images or shards")
    p.add_argument("--output", help="local directory or s3://bucket/prefix for the Parquet dataset")
    p.add_argument(
        "--input-list",
        default=None,
        metavar="URI",
        help="read the objects this manifest names instead of listing --input: Parquet or CSV with a 'key' "
        "column (keys under --input's prefix; for a local --input, paths relative to it), or an S3 "
        "Inventory manifest.json",
    )
    p.add_argument(
        "--model",
        default="vit_b_16",
        help="preset: vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14, vit_s_16, vit_ti_16",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="checkpoint path or s3:// URI (torchvision, timm or "
        "Hugging Face), or 'random' for seeded random weights",
    )
    p.add_argument("--format", default="auto", choices=FORMATS, help="input kind; auto decides by extension")
    p.add_argument("--image-column", default="image", help="Parquet inputs: the column with image bytes")
    p.add_argument("--key-column", default=None, help="Parquet inputs: a column to use as the row key")
    p.add_argument(
        "--keep-columns",
        type=_names,
        default=(),
        metavar="A,B",
        help="Parquet inputs: columns copied to the output unchanged (e.g. caption,url,id)",
    )
    p.add_argument("--image-size", type=int, default=None, help="model input size (default: the preset's)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"images per model call (default: {GPU_BATCH_SIZE} on GPU actors, {CPU_BATCH_SIZE} on CPU)",
    )
    p.add_argument("--embedding-dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--logits-dtype", default="float32", choices=("float32", "float16"))
    p.add_argument(
        "--max-error-rate",
        type=float,
        default=DEFAULT_MAX_ERROR_RATE,
        help="fraction of error rows above which the run exits with status 1",
    )
    p.add_argument(
        "--class-names",
        default=None,
        help="file with one class name per line, or a JSON list; 'none' for no names (default: the "
        "checkpoint's own, or ImageNet-1k's for 1,000-class checkpoints)",
    )
    p.add_argument(
        "--topk",
        type=int,
        default=DEFAULT_TOPK,
        help="the most probable classes written per row (top_classes, top_scores, top_names); 0: none",
    )
    p.add_argument(
        "--logits",
        default="full",
        choices=("full", "none"),
        help="none: write only the top-k columns, not the logits vector (about half the bytes per row)",
    )
    p.add_argument(
        "--mean",
        type=_triple,
        default=None,
        help="normalization mean, e.g. 0.5,0.5,0.5 (default: from the checkpoint's source)",
    )
    p.add_argument("--std", type=_triple, default=None, help="normalization std (default: as --mean)")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse images with more pixels than this")
    p.add_argument("--num-actors", type=int, default=None, help="model actors (default: one per GPU, or 1)")
    p.add_argument("--actor-cpus", type=float, default=None, help="CPUs per model actor without GPUs")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--compile", action="store_true", help="torch.compile the model in each actor")
    p.add_argument(
        "--decode",
        default="cpu",
        choices=("cpu", "gpu"),
        help="gpu: decode JPEGs with nvJPEG inside the model actors (needs torchvision); other "
        "formats and files nvJPEG rejects take the CPU path there",
    )
    p.add_argument(
        "--preprocess",
        default="fast",
        choices=("fast", "exact"),
        help="exact: torchvision's PIL path (Pillow decode and resize) bit for bit, about 3x the CPU time "
        "of fast (libjpeg-turbo DCT scaling + OpenCV, close to it but not equal)",
    )
    p.add_argument(
        "--max-object-bytes",
        type=int,
        default=DEFAULT_MAX_OBJECT_BYTES,
        help="objects (loose files, tar members, Parquet values) larger than this become error rows",
    )
    p.add_argument(
        "--retry-errors",
        action="store_true",
        help="re-read and re-embed the inputs whose committed rows are errors, replacing those rows",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --weights random")
    p.add_argument(
        "--commit-interval",
        dest="commit_interval_s",
        type=float,
        default=10.0,
        help="seconds between commits of finished units while the run goes on",
    )
    p.add_argument("--dry-run", action="store_true", help="check arguments, weights and input; run nothing")
    p.add_argument(
        "--demo",
        action="store_true",
        help=f"generate a sample under {DEMO_INPUT} and embed it "
        f"into {DEMO_OUTPUT} with vit_ti_16 and random weights",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument(
        "--version",
        action=_PrintVersions,
        help="print the project's version and the torch, CUDA and Ray versions it runs with, and exit",
    )
    args = p.parse_args(argv)
    if args.demo:
        args.input = args.input or DEMO_INPUT
        args.output = args.output or DEMO_OUTPUT
        if args.model == "vit_b_16":
            args.model = "vit_ti_16"
        args.weights = args.weights or "random"
    if not args.input or not args.output:
        p.error("--input and --output are required (or use --demo)")
    if args.weights is None:
        p.error("--weights is required: a checkpoint path or s3:// URI, or 'random' for random weights")
    return args


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """The options are JobConfig's fields, under the same names."""
    names = {f.name for f in dataclasses.fields(JobConfig)} & set(vars(args))
    return JobConfig(**{name: getattr(args, name) for name in names} | {"std": args.std or args.mean})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from pipeline.ledger import OutputConflictError
    from pipeline.plan import plan
    from pipeline.run import run
    from pipeline.storage import InputError
    from vit.checkpoints import CheckpointError

    imports = time.monotonic() - _LOADED  # this module's and the job's imports (torch, Ray, the pipeline)
    try:
        if args.demo and not os.path.exists(args.input):
            from pipeline.sample import make_sample

            make_sample(args.input)
            print(f"Generated a sample dataset in {args.input}")
        config = config_from_args(args)
        if config.dry_run:
            print(plan(config).describe())
            print(json.dumps({"dry_run": True, "output": config.output}))
            return 0
        summary = run(config)
        if __name__ == "__main__" and summary.startup:  # the command, not main() called from Python
            summary.startup = {"imports": round(imports, 3), **summary.startup}
    except (ConfigError, InputError, CheckpointError, OutputConflictError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # storage unreachable or not writable (listing errors are InputErrors already)
        print(f"error: could not access {args.output!r} or {args.input!r}: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the run broke off (a lost cluster, Ray Data's no-progress timeout, a bug)
        logging.getLogger("jobs.embed").info("the run stopped", exc_info=True)  # shown with --verbose
        print(
            f"error: the run stopped: {type(e).__name__}: {e}. Units committed so far are kept; run the "
            "same command again to do the rest (add --verbose for the traceback).",
            file=sys.stderr,
        )
        return 3
    print(summary.describe())
    if not config.output.startswith("s3://"):
        print(
            f'Look at it: python -c "import duckdb; duckdb.sql(\\"SELECT key, error, '
            f"len(embedding) AS dim FROM '{config.output}/*.parquet' LIMIT 5\\\").show()\""
        )
    print(json.dumps(summary.to_json()))
    return 1 if summary.error_rate > config.max_error_rate else 0


def cli(argv: list[str] | None = None) -> int:
    """`main` as the command runs it: SIGINT and SIGTERM stop it with one sentence and status 3, and
    so does losing the Ray cluster (ClusterWatch)."""
    install_signal_handlers()
    ClusterWatch().start()
    try:
        return main(argv)
    except Stopped as e:  # the run's clean-up has run; a local Ray shuts down as the process exits
        print(f"stopped by {e.name}: {RERUN}.", file=sys.stderr)
    # The stop may have cut into Ray Data's own clean-up: what Ray logs while it tears down from here (an
    # executor thread finding Ray already shut down, say) is noise after that sentence.
    for name, logger in list(logging.root.manager.loggerDict.items()):  # no new loggers made here
        if isinstance(logger, logging.Logger) and (name == "ray" or name.startswith("ray.")):
            logger.setLevel(logging.CRITICAL)
    gc.collect()  # abandoned Ray Data iterators shut their executors down now, while Ray is still up
    return 3


if __name__ == "__main__":
    status = cli()
    if status == 3:
        end_after_stop(status)
    sys.exit(status)
