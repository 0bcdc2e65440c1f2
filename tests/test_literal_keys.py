"""S3 keys are literal end to end: '%', '#', '?', spaces, '+', '=' and unicode in the --input prefix, in the
object names under it and in the --output prefix are key characters, never URL syntax (moto + local Ray)."""

from __future__ import annotations

from pathlib import Path

import boto3
import numpy as np
import pyarrow.dataset as pads
import pytest

from pipeline.config import JobConfig
from pipeline.run import run
from pipeline.sample import encode, photo_like
from pipeline.storage import resolve_uri

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = {"model": "vit_ti_16", "weights": "random", "image_size": 32, "batch_size": 16}
INPUT = "in%41 we#ird q?x=1+ünï"
# What a URL parser would make of INPUT: percent-decoded, cut at '#', cut at '?'. Objects there are decoys
# that must never be read, and nothing may be written there.
DECOYS = ("inA we#ird q?x=1+ünï", "in%41 we", "in%41 we#ird q")
OUTPUT = INPUT + "#embeddings"
NAMES = ("pc%41/a.jpg", "we#ird/b#1.jpg", "q?x/c?d=e.jpg", "a b+c=d/e f+g=h.jpg", "ünï/ö%20.jpg", "top.jpg")


def _list_bucket(s3, bucket: str) -> dict[str, str]:
    """Every key in the bucket → its ETag."""
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return out


def test_literal_input_and_output_prefixes(s3_server: str, s3_bucket: str, ray_local: None) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_server)
    rng = np.random.default_rng(0)
    for name in NAMES:
        s3.put_object(Bucket=s3_bucket, Key=f"{INPUT}/{name}", Body=encode(photo_like(rng, 48, 40)))
    for decoy in DECOYS:
        s3.put_object(Bucket=s3_bucket, Key=f"{decoy}/decoy.jpg", Body=encode(photo_like(rng, 40, 40)))
    before = _list_bucket(s3, s3_bucket)

    output = f"s3://{s3_bucket}/{OUTPUT}"
    summary = run(JobConfig(input=f"s3://{s3_bucket}/{INPUT}", output=output, **SMALL))

    fs, root = resolve_uri(output)
    assert root == f"{s3_bucket}/{OUTPUT}"
    keys = pads.dataset(root, filesystem=fs, format="parquet").to_table()["key"].to_pylist()
    assert sorted(keys) == sorted(NAMES), "every key exactly once, as it is in the bucket"
    assert summary.processed == len(NAMES) and summary.errors == 0

    after = _list_bucket(s3, s3_bucket)
    assert {k: v for k, v in after.items() if k in before} == before, "the input was modified"
    outside = [k for k in after if k not in before and not k.startswith(OUTPUT + "/")]
    assert not outside, f"written outside --output: {outside}"
    data = [k for k in after if k.startswith(OUTPUT + "/") and k.endswith(".parquet") and "/_" not in k]
    assert data and all("/" not in k[len(OUTPUT) + 1 :] for k in data)
    markers = [k for k in after if k.endswith("/")]
    assert not markers, f"directory marker objects written: {markers}"
    assert not [k for k in after if "/_staging/" in k], "staging left behind"


@pytest.mark.integration
def test_weights_and_class_names_at_literal_keys(s3_bucket: str, tmp_path: Path) -> None:
    """The model stage opens --weights and --class-names through the same literal resolver."""
    from safetensors.torch import save_file

    from pipeline.embed import ModelSpec
    from vit.checkpoints import load_model

    path = tmp_path / "w.safetensors"
    save_file(load_model("vit_ti_16", "random").model.state_dict(), path)
    s3 = boto3.client("s3")
    s3.upload_file(str(path), s3_bucket, "m#1/v%41 ?.safetensors")
    s3.put_object(Bucket=s3_bucket, Key="m#1/names?.txt", Body="\n".join(map(str, range(1000))).encode())
    spec = ModelSpec(
        "vit_ti_16",
        f"s3://{s3_bucket}/m#1/v%41 ?.safetensors",
        class_names=f"s3://{s3_bucket}/m#1/names?.txt",
    )
    loaded = spec.load()
    assert loaded.sha256 is not None and loaded.class_names[:2] == ["0", "1"]
