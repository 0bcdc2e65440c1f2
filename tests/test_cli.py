"""jobs/embed.py as a user runs it: exit codes, one-sentence errors, the JSON last line, --dry-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.sample import make_sample

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--model", "vit_ti_16", "--weights", "random", "--image-size", "32", "--batch-size", "8"]


def _job(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
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
    ],
)
def test_cannot_run_exits_2_with_one_sentence(tmp_path: Path, args: list[str], expect: str):
    make_sample(tmp_path / "in", n=2)
    (tmp_path / "empty").mkdir()
    proc = _job(*args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expect in _one_sentence(proc.stderr)
    assert not (tmp_path / "o").exists(), "a run that cannot start must not write anything"


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
def test_too_many_errors_writes_everything_then_exits_1(tmp_path: Path):
    make_sample(tmp_path / "in", n=3)
    (tmp_path / "in" / "junk.jpg").write_bytes(b"\x00" * 100)
    proc = _job("--input", "in", "--output", "o", *SMALL, "--max-error-rate", "0.1", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["processed"] == 4 and summary["errors"] == 1
    assert "--max-error-rate" in proc.stdout
    # And within the budget the same data exits 0 (the rows are already there: nothing is redone).
    ok = _job("--input", "in", "--output", "o", *SMALL, "--max-error-rate", "0.5", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads(ok.stdout.strip().splitlines()[-1])["skipped"] == 4
