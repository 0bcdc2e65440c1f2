"""Every benchmark script imports (the names it takes from its sibling scripts and from the project exist),
and the GPU script's steps run in their CPU smoke mode: a benchmark is run rarely, often on a borrowed GPU
machine, and must not be found broken there."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_a_benchmark_script_imports(script: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)  # runs nothing: every script's work is under `if __name__ == "__main__"`
    assert callable(getattr(module, "main", None)), f"{script.name} has no main()"


@pytest.mark.slow
def test_the_gpu_decode_benchmark_runs_its_cpu_smoke_mode():
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "gpu_decode.py"),
            *("--images", "16", "--distinct", "2", "--rounds", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PSNR vs CPU path" in proc.stdout
