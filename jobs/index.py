"""Build or update the nearest-neighbour index of a job's output (cosine similarity over its embeddings).

    python jobs/index.py --output s3://bucket/embeddings     # after jobs/embed.py, and after each rerun
    python jobs/index.py --output out/demo --kind hnsw --rebuild
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/index.py --output s3://…

The index lives in <output>/_index/ (pipeline/vector_index.py): only data files that are new or changed
since the last build are read. Search it from Python with pipeline.vector_index.VectorIndex.open(output).

The last line on stdout is one JSON object with the summary; the exit status is 0 when the index is up to
date, 2 when it could not be built (one sentence on stderr says why: a bad argument, no output, data files
of different models, storage that cannot be reached).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python jobs/index.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

from jobs._args import OneSentenceParser as _Parser  # noqa: E402
from pipeline.vector_index import KINDS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(
        prog="jobs/index.py",
        description="Build or update the nearest-neighbour index of an embedding job's output.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--output", required=True, help="the job's --output: a local directory or s3://bucket/prefix"
    )
    p.add_argument(
        "--kind",
        default="auto",
        choices=KINDS,
        help="flat: exact search; ivf or hnsw: approximate; auto: exact while small, ivf above "
        "(an index built with an explicit kind keeps it)",
    )
    p.add_argument("--rebuild", action="store_true", help="read every data file and build the index anew")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if not args.output.strip():
        p.error("--output is empty: pass the job's --output, a local directory or s3://bucket/prefix")
    return args


def describe(summary: dict) -> str:
    model = summary["model"]
    params = ", ".join(f"{k}={v}" for k, v in summary["params"].items()) or "exact"
    if not summary["updated"]:
        head = "The index is up to date"
    else:
        how = "built anew" if summary["rebuilt"] else "updated"
        head = (
            f"Index {how}: {summary['files_added']} new, {summary['files_changed']} replaced and "
            f"{summary['files_removed']} removed data file(s); {summary['files_read']} read, "
            f"+{summary['vectors_added']} / -{summary['vectors_removed']} vectors"
        )
    return "\n".join(
        [
            f"{head} in {summary['seconds']:.1f} s.",
            f"output:  {summary['output']}",
            f"index:   {summary['kind']} ({params}), {summary['vectors']} vectors from {summary['files']} "
            f"data file(s) of {len(summary['run_ids'])} run(s)",
            f"model:   {model.get('model')} weights_sha256={str(model.get('weights_sha256'))[:16]} "
            f"dim={model.get('embedding_dim')}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from pipeline.storage import InputError
    from pipeline.storage import describe as describe_error
    from pipeline.vector_index import VectorIndexError, build_index

    try:
        summary = build_index(args.output, kind=args.kind, rebuild=args.rebuild)
    except (VectorIndexError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # storage unreachable, not readable or not writable
        print(f"error: could not read or write {args.output!r}: {describe_error(e)}.", file=sys.stderr)
        return 2
    print(describe(summary))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
