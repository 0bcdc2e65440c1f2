"""jobs/embed.py as a user runs it: exit codes, one-sentence errors, the JSON last line, --dry-run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.config import ConfigError, JobConfig
from pipeline.sample import make_sample
from tests.conftest import job_env
from tests.ray_head import RayHead

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--model", "vit_ti_16", "--weights", "random", "--image-size", "32", "--batch-size", "8"]


def _job(
    *args: str, cwd: Path, timeout: int = 300, head: RayHead | None = None
) -> subprocess.CompletedProcess:
    """The job as a user runs it: with a local Ray of its own, or a driver on `head` (the tests' Ray; give
    it absolute paths, the cluster's workers do not run in `cwd`)."""
    env = job_env(head)
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "embed.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def _one_sentence(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--input", "nowhere", "--output", "o", *SMALL], "nowhere"),
        (
            ["--input", "in", "--output", "o", "--model", "vit_ti_16", "--weights", "missing.pth"],
            "missing.pth",
        ),
        (["--input", "in", "--output", "o", "--model", "vit_x_99", "--weights", "random"], "vit_x_99"),
        (["--input", "in", "--output", "o", *SMALL, "--batch-size", "0"], "--batch-size"),
        (["--input", "in", "--output", "in", *SMALL], "--output"),
        (["--input", "in", "--output", "in/embeddings", *SMALL], "--output"),
        (["--input", "empty", "--output", "o", *SMALL], "empty"),
        (["--input", "in", "--output", "o", *SMALL, "--keep-columns", "caption"], "Parquet inputs through"),
        (["--input", "in", "--output", "o", *SMALL, "--keep-columns", "url,key"], "cannot keep key"),
        (["--input", "in", "--output", "o", *SMALL, "--topk", "-1"], "--topk"),
        (["--input", "in", "--output", "o", *SMALL, "--preprocess", "exact", "--decode", "gpu"], "exact"),
    ],
)
def test_cannot_run_exits_2_with_one_sentence(
    tmp_path: Path, args: list[str], expect: str, monkeypatch, capsys
):
    make_sample(tmp_path / "in", n=2)
    (tmp_path / "empty").mkdir()
    code, err = _main_without_ray(args, tmp_path, monkeypatch, capsys)
    assert code == 2, err
    assert expect in _one_sentence(err)
    assert not (tmp_path / "o").exists(), "a run that cannot start must not write anything"


def _main_without_ray(args: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """`jobs/embed.py` in this process (the imports are paid once, not per case), in `cwd`, with Ray's
    start made to fail: (exit status, stderr). The process as a user starts it is covered by
    test_a_bad_argument_exits_2_from_the_command_line."""
    import pipeline.run
    from jobs.embed import main

    def no_ray(*_a, **_k):
        raise AssertionError("Ray was started for a run that cannot run")

    monkeypatch.setattr(pipeline.run, "ensure_ray", no_ray)
    monkeypatch.chdir(cwd)
    code = main(args)
    return code, capsys.readouterr().err


def test_a_bad_argument_exits_2_from_the_command_line(tmp_path: Path):
    make_sample(tmp_path / "in", n=2)
    proc = _job("--input", "in", "--output", "o", *SMALL, "--std", "0,0,0", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--std must be above 0" in _one_sentence(proc.stderr)
    assert "Started a local Ray instance" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_run_that_breaks_off_exits_3_and_says_to_run_again(tmp_path, monkeypatch, capsys):
    import pipeline.run
    from jobs.embed import main

    def broken(config):
        raise RuntimeError("the cluster went away")

    monkeypatch.setattr(pipeline.run, "run", broken)
    make_sample(tmp_path / "in", n=2)
    code = main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o"), *SMALL])
    assert code == 3
    line = _one_sentence(capsys.readouterr().err)
    assert "RuntimeError: the cluster went away" in line and "run the same command again" in line


def test_missing_weights_flag_is_a_usage_error(tmp_path: Path):
    proc = _job("--input", "in", "--output", "o", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "--weights is required" in proc.stderr


def test_dry_run_runs_nothing(tmp_path: Path):
    make_sample(tmp_path / "in", n=3)
    proc = _job("--input", "in", "--output", "o", *SMALL, "--dry-run", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "3 shards to do" in proc.stdout and "vit_ti_16" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1])["dry_run"] is True
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_too_many_errors_writes_everything_then_exits_1(tmp_path: Path, ray_cluster: RayHead):
    make_sample(tmp_path / "in", n=3)
    (tmp_path / "in" / "junk.jpg").write_bytes(b"\x00" * 100)
    where = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]
    proc = _job(*where, *SMALL, "--max-error-rate", "0.1", cwd=tmp_path, head=ray_cluster)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["processed"] == 4 and summary["errors"] == 1
    assert "--max-error-rate" in proc.stdout
    assert 0 < summary["startup"]["imports"] < summary["startup"]["first_row"]
    assert "Start: imports" in proc.stdout
    # And within the budget the same data exits 0 (the rows are already there: nothing is redone).
    ok = _job(*where, *SMALL, "--max-error-rate", "0.5", cwd=tmp_path, head=ray_cluster)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads(ok.stdout.strip().splitlines()[-1])["skipped"] == 4


# --- refused before Ray starts: exit 2, one sentence, nothing run ---


def _garbage_safetensors(tmp_path: Path) -> None:
    (tmp_path / "garbage.safetensors").write_bytes(bytes(range(100)))


def _truncated_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from vit.checkpoints import load_model

    save_file(load_model("vit_ti_16", "random").model.state_dict(), tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("args", "make", "expect"),
    [
        (["--image-size", "30"], None, ["image size 30 is not a multiple of the patch size 16", "e.g. 32"]),
        (
            ["--weights", "truncated.safetensors"],
            _truncated_safetensors,
            ["/truncated.safetensors' is truncated"],
        ),
        (
            ["--weights", "garbage.safetensors"],
            _garbage_safetensors,
            ["/garbage.safetensors' is not a valid safetensors file"],
        ),
        (["--std", "0,0,0"], None, ["--std must be above 0"]),
        (["--mean", "0.5,0.5"], None, ["--mean must be three finite numbers"]),
        (["--std", "nan,1,1"], None, ["--std must be three finite numbers"]),
        (["--max-object-bytes", "0"], None, ["--max-object-bytes must be at least 1"]),
        (["--actor-cpus", "0"], None, ["--actor-cpus must be a positive number"]),
    ],
)
def test_bad_arguments_and_weights_exit_2_before_ray_starts(
    tmp_path: Path, args, make, expect, monkeypatch, capsys
):
    make_sample(tmp_path / "in", n=2)
    if make:
        make(tmp_path)
    small = dict(zip(SMALL[::2], SMALL[1::2]))
    small.update(zip(args[::2], args[1::2]))
    argv = ["--input", "in", "--output", "o", *[x for kv in small.items() for x in kv]]
    code, err = _main_without_ray(argv, tmp_path, monkeypatch, capsys)
    assert code == 2, err[-3000:]
    line = _one_sentence(err)
    assert all(e in line for e in expect), line
    assert "weights_only=False" not in line and "unpickling" not in line
    assert not (tmp_path / "o" / "_runs").exists()


def test_mean_and_std_numbers_reach_the_config():
    from jobs.embed import config_from_args, parse_args

    args = parse_args(["--input", "i", "--output", "o", "--weights", "random", "--std", "0.2,0.3,0.4"])
    assert config_from_args(args).std == (0.2, 0.3, 0.4)
    with pytest.raises(SystemExit):  # argparse: not numbers at all
        parse_args(["--input", "i", "--output", "o", "--weights", "random", "--mean", "a,b,c"])


def test_new_options_reach_the_config():
    from jobs.embed import config_from_args, parse_args

    base = ["--input", "i", "--output", "o", "--weights", "random"]
    default = config_from_args(parse_args(base))
    assert default.max_object_bytes == 64 * 2**20 and default.retry_errors is False
    config = config_from_args(parse_args([*base, "--max-object-bytes", "1000", "--retry-errors"]))
    assert config.max_object_bytes == 1000 and config.retry_errors is True


# --- model outputs that are not finite never become successful rows ---


def test_nan_or_infinite_model_outputs_become_error_rows(monkeypatch):
    from pipeline.embed import EmbedPatches, ModelSpec

    stage = EmbedPatches(ModelSpec("vit_ti_16", "random", image_size=32), device="cpu", cpu_threads=1)
    n = 5
    emb = np.ones((n, 192), np.float32)
    logits = np.ones((n, 1000), np.float32)
    emb[1, 3], logits[3, 7] = np.nan, np.inf
    monkeypatch.setattr(stage, "_forward", lambda patches: (emb[: len(patches)], logits[: len(patches)]))
    batch = {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "patches": np.zeros((n, 4, 768), np.uint8),
        "error": np.array([None, None, None, None, "decode: broken"], dtype=object),
    }
    out = stage(batch)
    assert [e is None for e in out["error"]] == [True, False, True, False, False]
    assert out["error"][1].startswith("embed: the model produced NaN or infinite values")
    assert out["error"][4] == "decode: broken"
    assert np.isfinite(out["embedding"]).all() and np.isfinite(out["logits"]).all()
    assert not out["embedding"][[1, 3]].any() and out["embedding"][[0, 2]].all()


def test_float16_overflow_is_an_error_row_not_inf(monkeypatch):
    from pipeline.embed import EmbedPatches, ModelSpec

    spec = ModelSpec("vit_ti_16", "random", image_size=32)
    stage = EmbedPatches(spec, embedding_dtype="float16", device="cpu", cpu_threads=1)
    emb = np.array([[1.0] * 192, [1e6] * 192], np.float32)  # 1e6 is beyond float16's 65504
    monkeypatch.setattr(stage, "_forward", lambda patches: (emb, np.zeros((2, 1000), np.float32)))
    out = stage({"key": np.array(["a", "b"], dtype=object), "patches": np.zeros((2, 4, 768), np.uint8)})
    assert out["error"][0] is None and out["error"][1].startswith("embed: the model produced NaN")


# --- model actors that do not fit on the cluster ---


def _fake_cluster(monkeypatch, *nodes: dict[str, float]) -> None:
    import ray

    total: dict[str, float] = {}
    for node in nodes:
        for k, v in node.items():
            total[k] = total.get(k, 0.0) + v
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": n} for n in nodes])
    monkeypatch.setattr(ray, "cluster_resources", lambda: total)


GIB = 2**30
PLAN = SimpleNamespace(num_params=5_000_000)


def test_actors_are_counted_per_node_leaving_a_cpu_for_decoding(monkeypatch):
    from pipeline.cluster import actor_stage

    head = {"memory": 8 * GIB}  # a KubeRay head with num-cpus 0
    cpu_node = {"CPU": 16.0, "memory": 32 * GIB}
    _fake_cluster(monkeypatch, head, cpu_node, cpu_node)
    config = JobConfig(input="i", output="o", num_actors=10, actor_cpus=4)
    stage = actor_stage(config, PLAN)  # type: ignore[arg-type]
    # 4 per node fit, 8 in all; one node keeps a CPU free for reading and decoding: 7.
    assert stage.size == 7 and stage.task_slots == 4
    assert "instead of --num-actors 10" in stage.note
    default = actor_stage(JobConfig(input="i", output="o"), PLAN)  # type: ignore[arg-type]
    assert (
        default.remote_args["num_cpus"] == 8 and default.size == 1 and not default.note
    )  # the head has none

    gpu_node = {"CPU": 8.0, "GPU": 4.0, "memory": 2.5 * GIB}  # memory for 2 actors of 1 GiB + weights
    _fake_cluster(monkeypatch, head, gpu_node)
    stage = actor_stage(JobConfig(input="i", output="o"), PLAN)  # type: ignore[arg-type]
    assert stage.size == 2 and "instead of 4 (one per GPU)" in stage.note


@pytest.mark.parametrize(
    ("nodes", "overrides", "expect"),
    [
        ([{"CPU": 2.0, "memory": 8 * GIB}], {"actor_cpus": 8}, "--actor-cpus 8 needs 8 CPUs per model actor"),
        ([{"CPU": 2.0, "memory": 8 * GIB}], {"actor_cpus": 2}, "use --actor-cpus 1 or less"),
        ([{"CPU": 1.0, "memory": 8 * GIB}], {}, "at least 2 CPUs"),
        ([{"CPU": 16.0, "memory": 0.5 * GIB}], {}, "GiB of Ray's memory resource on one node"),
        ([{"CPU": 1.0, "GPU": 1.0, "memory": 8 * GIB}], {}, "at least 2 CPUs"),
    ],
)
def test_no_actor_fitting_is_a_config_error(monkeypatch, nodes, overrides, expect: str):
    from pipeline.cluster import actor_stage

    _fake_cluster(monkeypatch, *nodes)
    with pytest.raises(ConfigError, match=re.escape(expect)):
        actor_stage(JobConfig(input="i", output="o", **overrides), PLAN)  # type: ignore[arg-type]


@pytest.mark.integration
@pytest.mark.slow
def test_actor_stage_on_a_real_two_cpu_ray(ray_local):
    from pipeline.cluster import actor_stage

    one = actor_stage(JobConfig(input="i", output="o"), PLAN)  # type: ignore[arg-type]
    assert (one.size, one.remote_args["num_cpus"], one.task_slots, one.note) == (1, 1.0, 1.0, "")
    two = actor_stage(JobConfig(input="i", output="o", num_actors=2), PLAN)  # type: ignore[arg-type]
    assert two.size == 1 and "Running 1 model actor(s) instead of --num-actors 2" in two.note
    with pytest.raises(
        ConfigError, match=r"--actor-cpus 8 needs 8 CPUs per model actor; the largest node has 2"
    ):
        actor_stage(JobConfig(input="i", output="o", actor_cpus=8), PLAN)  # type: ignore[arg-type]


@pytest.mark.integration
@pytest.mark.slow
def test_actors_that_cannot_fit_exit_2_instead_of_waiting(tmp_path: Path, ray_cluster: RayHead):
    """On a cluster (the tests' Ray, 2 CPUs) whose nodes are too small for the model actors."""
    make_sample(tmp_path / "in", n=2)
    start = time.monotonic()
    where = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]
    proc = _job(*where, *SMALL, "--actor-cpus", "8", cwd=tmp_path, timeout=180, head=ray_cluster)
    assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
    assert "--actor-cpus 8 needs 8 CPUs per model actor" in _one_sentence(proc.stderr)
    assert time.monotonic() - start < 120
    assert not (tmp_path / "o" / "_runs").exists()


def test_local_paths_are_made_absolute_in_the_driver(tmp_path: Path, monkeypatch):
    """Workers resolve paths in their own working directory: on a cluster that is not the driver's."""
    monkeypatch.chdir(tmp_path)
    config = JobConfig(input="in", output="./out/", input_list="~/list.csv", weights="w.safetensors")
    assert config.input == str(tmp_path / "in") and config.output == str(tmp_path / "out")
    assert config.input_list == os.path.expanduser("~/list.csv")
    assert config.weights == str(tmp_path / "w.safetensors")
    kept = JobConfig(input="s3://b/in", output="file:///data/out", weights="random")
    assert (kept.input, kept.output, kept.weights) == ("s3://b/in", "file:///data/out", "random")
