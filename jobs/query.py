"""Ask an embedding job's output questions: nearest neighbours, top classes, duplicates, errors, statistics.

    python jobs/query.py similar --output out/demo --key img_0000.jpg -k 5
    python jobs/query.py similar --output out/demo --image data/sample/img_0000.jpg
    python jobs/query.py top --output out/demo --key img_0000.jpg
    python jobs/query.py dups --output out/demo --threshold 0.95
    python jobs/query.py errors --output s3://bucket/embeddings --list
    python jobs/query.py stats --output s3://bucket/embeddings --json

Every command prints a readable table, or with --json one JSON object. `similar` and `dups` use the
output's vector index (jobs/index.py) when it covers the data as it is now and search exactly otherwise;
they say which. The exit status is 0 when the question was answered, 2 when it could not be (one sentence
on stderr says why: a bad argument, no output there, a key the output does not hold, an image or weights
that cannot be read).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python jobs/query.py` from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

from jobs._args import OneSentenceParser as _Parser  # noqa: E402
from pipeline.query import DEFAULT_K, DEFAULT_LIMIT, DEFAULT_THRESHOLD  # noqa: E402


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def _cosine(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a cosine similarity above 0 and at most 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    common = _Parser(add_help=False)
    common.add_argument(
        "--output", required=True, help="the job's --output: a local directory or s3://bucket/prefix"
    )
    common.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p = _Parser(
        prog="jobs/query.py",
        description="Ask an embedding job's output questions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    s = sub.add_parser(
        "similar", parents=[common], formatter_class=fmt, help="nearest neighbours by cosine similarity"
    )
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", help="the key of a row of the output")
    which.add_argument("--image", help="an image file (path or s3:// URI), embedded with the output's model")
    s.add_argument("-k", type=_positive, default=DEFAULT_K, help="how many neighbours")
    s.add_argument(
        "--weights",
        help="with --image: the checkpoint to use when the path the output records does not open here "
        "(it must be the same file: its sha256 is checked)",
    )

    t = sub.add_parser("top", parents=[common], formatter_class=fmt, help="a row's most probable classes")
    t.add_argument("--key", required=True, help="the key of a row of the output")

    d = sub.add_parser("dups", parents=[common], formatter_class=fmt, help="exact and near-duplicate images")
    d.add_argument(
        "--threshold", type=_cosine, default=DEFAULT_THRESHOLD, help="least cosine of a near-duplicate pair"
    )
    d.add_argument(
        "--limit", type=_positive, default=DEFAULT_LIMIT, help="most near-duplicate pairs shown (the closest)"
    )

    e = sub.add_parser("errors", parents=[common], formatter_class=fmt, help="error rows by message")
    e.add_argument("--list", action="store_true", help="also list the keys of each message")

    sub.add_parser("stats", parents=[common], formatter_class=fmt, help="what the output holds")

    args = p.parse_args(argv)
    if not args.output.strip():
        p.error("--output is empty: pass the job's --output, a local directory or s3://bucket/prefix")
    if args.command == "similar" and args.weights and not args.image:
        p.error("--weights goes with --image (the query image is embedded with it)")
    return args


# --------------------------------------------------------------------------------------------------------
# Tables


def table(header: list[str], rows: list[list[Any]], right: frozenset[int] = frozenset()) -> str:
    """Columns padded to their widest cell; the columns in `right` right-aligned."""
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def describe_similar(r: dict[str, Any]) -> str:
    query = r["query"].get("key") or r["query"].get("image")
    what = "the row" if "key" in r["query"] else "the image"
    rows = [[i + 1, f"{x['cosine']:.6f}", x["key"]] for i, x in enumerate(r["results"])]
    return "\n".join(
        [
            f"Nearest neighbours of {what} {query} in {r['output']}, by {r['how']}:",
            table(["rank", "cosine", "key"], rows, right=frozenset({0})),
        ]
    )


def describe_top(r: dict[str, Any]) -> str:
    header = ["rank", "class", "score"] + (["name"] if r["names"] else [])
    rows = [
        [c["rank"], c["class"], f"{c['score']:.6f}"] + ([c["name"]] if r["names"] else [])
        for c in r["classes"]
    ]
    names = "" if r["names"] else " (the output has no class names)"
    source = " (from its logits)" if r["source"] == "logits" else ""
    return "\n".join(
        [
            f"Most probable classes of {r['key']} in {r['output']}{source}{names}:",
            table(header, rows, right=frozenset({0, 1})),
        ]
    )


def describe_dups(r: dict[str, Any]) -> str:
    exact = r["exact"]
    lines = [
        f"Exact duplicates (same bytes_sha256) in {r['output']}: {len(exact)} group(s), "
        f"{sum(len(g['keys']) for g in exact)} rows"
    ]
    lines += [f"  {g['sha256'][:16]}…  {', '.join(g['keys'])}" for g in exact]
    if r["near"] is None:
        lines.append(f"Near duplicates: {r['how']}.")
        return "\n".join(lines)
    more = f" (the {r['limit']} closest shown; raise --limit for more)" if r["truncated"] else ""
    lines.append(
        f"Near duplicates (cosine >= {r['threshold']}), by {r['how']}: {len(r['near'])} pair(s){more}"
    )
    if r["near"]:
        rows = [
            [f"{p['cosine']:.6f}", p["a"], p["b"], "same bytes" if p["same_bytes"] else ""] for p in r["near"]
        ]
        lines.append(table(["cosine", "key", "key", ""], rows))
    return "\n".join(lines)


def describe_errors(r: dict[str, Any]) -> str:
    head = f"{r['error_rows']} of {r['rows']} rows in {r['output']} are errors"
    if not r["errors"]:
        return head + "."
    lines = [head + ":"]
    if "keys" in r["errors"][0]:
        for g in r["errors"]:
            lines.append(f"{g['count']:>6}  {g['error']}")
            lines += [f"        {k}" for k in g["keys"]]
    else:
        lines.append(
            table(["count", "error"], [[g["count"], g["error"]] for g in r["errors"]], right=frozenset({0}))
        )
    return "\n".join(lines)


def describe_stats(r: dict[str, Any]) -> str:
    m = r["model"]
    seed = f" (seed {m['seed']})" if m.get("seed") else ""
    index = r["index"]
    if not index["exists"]:
        index_line = "none (python jobs/index.py builds one)"
    else:
        state = "current" if index["current"] else f"stale: {index['stale_files']} data file(s) not covered"
        index_line = f"{index['kind']}, {index['vectors']} vectors, built {index['built_at']}; {state}"
    lines = [
        f"output:     {r['output']}",
        f"rows:       {r['rows']} ({r['error_rows']} errors) in {r['data_files']} data file(s), "
        f"{r['data_bytes']:,} bytes",
        f"model:      {m.get('model')} weights={m.get('weights')}{seed} sha256={m.get('weights_sha256')}",
        f"preprocess: {m.get('preprocess', 'fast')}, image_size={m.get('image_size')} "
        f"patch_size={m.get('patch_size')} resize_size={m.get('resize_size')} mean={m.get('mean')} "
        f"std={m.get('std')}",
        f"embedding:  {r['embedding']['dim']} x {r['embedding']['dtype']}; class names: "
        f"{'yes' if r['class_names'] else 'no'}",
        f"index:      {index_line}",
        f"schema:     version {r['schema_version']}, columns:",
        table(["  name", "type"], [[f"  {c['name']}", c["type"]] for c in r["columns"]]),
        "runs:",
        table(
            ["run_id", "rows", "errors"],
            [[x["run_id"], x["rows"], x["error_rows"]] for x in r["runs"]],
            right=frozenset({1, 2}),
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline import query
    from pipeline.storage import describe

    try:
        if args.command == "similar":
            if args.key is not None:
                result = query.similar_to_key(args.output, args.key, args.k)
            else:
                result = query.similar_to_image(args.output, args.image, args.k, args.weights)
            text = describe_similar
        elif args.command == "top":
            result, text = query.top(args.output, args.key), describe_top
        elif args.command == "dups":
            result, text = query.dups(args.output, args.threshold, args.limit), describe_dups
        elif args.command == "errors":
            result, text = query.errors(args.output, args.list), describe_errors
        else:
            result, text = query.stats(args.output), describe_stats
    except query.QueryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # storage that cannot be reached or read while the query runs
        print(f"error: could not read {args.output!r}: {describe(e)}.", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
