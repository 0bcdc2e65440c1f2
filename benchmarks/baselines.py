"""This job against the batch-inference patterns of Ray Data's documentation and of Daft, end to end.

Three systems embed the same JPEGs with the same model on this machine, each in a fresh process, so that
imports, starting Ray (or Daft's runner), loading the model and writing Parquet all count:

- **ours**: this project's job. Model ``trivial``: ``pipeline.run.run(JobConfig(model="vit_ti_16",
  weights="random"), embedder=FakeEmbedPatches, embedder_kwargs={"embedding_dim": 192, "num_classes":
  1000})`` in a child (``--child ours``); model ``vit_ti_16``: the command itself, ``python jobs/embed.py
  --input DIR --output OUT --model vit_ti_16 --weights random``. Its JSON summary (the last line on stdout)
  gives ``startup``: imports, ray, plan, first_part, first_row seconds.
- **raydocs**: the pattern of Ray Data's batch-inference docs, in a child that starts a local Ray as a
  user would (``ray.init(include_dashboard=False)``): ``ray.data.read_images(DIR, mode="RGB",
  include_paths=True)`` → ``.map(preprocess)`` (torchvision on PIL: ``Resize(256)`` (bilinear, antialiased),
  ``CenterCrop(224)``, ``ToTensor()``, ``Normalize(ImageNet)``) → ``.map_batches(ModelClass,
  compute=ActorPoolStrategy(size=1), batch_size=64, num_cpus=1)`` → ``.write_parquet(OUT)``, columns path,
  embedding, logits, top_classes, top_scores (the docs' example also keeps the original image in the
  rows until it writes; this one does not). Ray Data 2.60 runs it as ReadImage tasks (read + Pillow
  decode) → one actor operator ``Map(preprocess)->MapBatches(RayDocsModel)``: it fuses the per-row
  preprocessing into the model actor, so resizing runs there, on the actor's one CPU.
- **daft**: Daft's native runner, in its own virtualenv (``--daft-python``; Daft 0.7 wants pyarrow < 26):
  ``daft.from_glob_path`` → ``col("path").download().decode_image(mode="RGB")`` → ``.resize(341, 256)
  .crop((58, 16, 224, 224))`` (Resize(256) + CenterCrop(224) of a 500×375 image, in Daft's own Rust code;
  every image of the set is 500×375) → a ``@daft.cls(max_concurrency=1)`` class whose
  ``@daft.method.batch(batch_size=64)`` runs the model (normalization included) → ``write_parquet(OUT)``,
  the same columns. One instance (Daft 0.7 would otherwise make two, in two threads), as the others have
  one model actor. Torch runs with its default threads there (2 here).

Models, the same in all three: ``trivial`` is ``FakeEmbedPatches``' computation (a fixed random projection,
seed 0, of the mean 16×16 patch of the 224×224 crop, scaled to [0, 1]: 192 embedding + 1,000 logit
values, then top-5 with softmax scores), written again in numpy for the baselines; ``vit_ti_16`` is
``vit.checkpoints.load_model("vit_ti_16", "random", seed=0)``, the model the job builds for
``--weights random``, on CPU in fp32 (the baselines call ``model(images)`` on normalized float images; the
job folds the normalization into the patch projection). Preprocessing differs only as the systems do:
ours decodes with libjpeg-turbo's DCT scaling and resizes with OpenCV (``--preprocess fast``, the default);
the baselines decode with Pillow (raydocs) or Daft's decoder and resize bilinear with antialiasing. The
``cos`` column checks that the model is the same: the smallest cosine similarity, over all images, of a
baseline's embedding with ours for the same file (1.0 would be identical pixels).

Measured per (model, N, system, round): the child's wall seconds from spawn to exit; the seconds until
the first Parquet data file is visible in the output (this process polls every 50 ms; for ours only
committed top-level ``*.parquet`` count, not ``_staging``/``_runs``/``_ledger``; the baselines write their
files in place, so theirs is a file that has been opened, ours one that is complete); the rows written,
read back with this interpreter's pyarrow (a run is ``ok`` when the child exited 0 and rows = N); the
CPU seconds of the run's processes (each process's user + system time when last seen, every 0.5 s: a
process's last half second can be missed) and, from ``/proc/stat``, the machine's other busy CPU seconds
meanwhile (other work on a shared machine; about 0 on an idle one); the 1-minute load average before and
after. Ratios are a baseline's seconds ÷ ours (above 1: ours is faster).
Rounds run the systems in a rotated order; the table shows each round. Between runs the processes a
child started (Ray's) are waited for (killed after 30 s) and ``--pause-s`` passes.

What the first-file column shows on 2 CPUs: ours commits a unit's file while the run goes on (its write
tasks take no CPU). The Ray docs' pattern writes one file per read block, but its write tasks ask for a
CPU each and wait while the read tasks and the model actor hold both, so files appear near the end. Daft
writes one file, at the end.

Images: ``N`` distinct real photographs, 500×375 JPEG q90: random 4:3 crops (60–100 % of the largest) of
scikit-image's sample photos (``pipeline.sample.PHOTOGRAPHS``), flipped half of the time, LANCZOS-resized;
image i depends only on (seed, i). Cached under ``--images-dir`` (``photos-N/``) between runs.

    .venv/bin/python benchmarks/baselines.py --daft-python /tmp/daft-venv/bin/python
    .venv/bin/python benchmarks/baselines.py --models trivial --sizes 2000 --systems ours,raydocs
    .venv/bin/python benchmarks/baselines.py --models vit_ti_16 --sizes 2000 --rounds 3 --json > vit.json
    .venv/bin/python benchmarks/baselines.py --report trivial.json vit.json    # one table of saved runs

Defaults: ``trivial`` at 2,000 and 20,000 images, ``vit_ti_16`` at 2,000 (20,000 takes ~25 min per system
on 2 CPUs); ``--sizes`` applies to every model. The Daft virtualenv (no second torch: it sees this
checkout's venv after its own packages)::

    python3 -m venv /tmp/daft-venv && /tmp/daft-venv/bin/pip install daft numpy pillow
    echo /path/to/.venv/lib/python3.11/site-packages \\
        > /tmp/daft-venv/lib/python3.11/site-packages/zz-main-venv.pth
    /tmp/daft-venv/bin/python -c "import daft, torch, pyarrow"
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

_T0 = time.monotonic()  # before the heavy imports: a child reports what they took (as jobs/embed.py does)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: before benchmarks/ (its pipeline.py)

SYSTEMS = ("ours", "raydocs", "daft")
MODELS = ("trivial", "vit_ti_16")
DEFAULT_SIZES = {"trivial": (2000, 20000), "vit_ti_16": (2000,)}
WIDTH, HEIGHT, QUALITY = 500, 375, 90
RESIZE, CROP, PATCH = 256, 224, 16
BATCH = 64
EMBED_DIM, NUM_CLASSES, TOPK = 192, 1000, 5
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
POLL_S = 0.05
SCAN_S = 0.5  # how often the processes of a run are listed and their CPU time read
LEFTOVER_WAIT_S = 30.0

# ---------------------------------------------------------------------------------------------------------
# Images

_PHOTOS: list[Any] = []


def _photo(i: int, seed: int, path: str) -> None:
    """Image i: a random 4:3 crop of a sample photo, maybe flipped, LANCZOS-resized, JPEG q90."""
    import numpy as np
    from PIL import Image

    if not _PHOTOS:
        from skimage import data as skdata

        from pipeline.sample import PHOTOGRAPHS

        _PHOTOS.extend(np.asarray(getattr(skdata, p)())[..., :3] for p in PHOTOGRAPHS)
    a = _PHOTOS[i % len(_PHOTOS)]
    rng = np.random.default_rng([seed, i])
    h, w = a.shape[:2]
    cw = int(min(w, h * 4 / 3) * rng.uniform(0.6, 1.0))
    ch = cw * 3 // 4
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = Image.fromarray(np.ascontiguousarray(a[y : y + ch, x : x + cw]), "RGB")
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    im.resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS).save(path, quality=QUALITY)


def _photos(start: int, stop: int, seed: int, directory: str) -> None:
    for i in range(start, stop):
        _photo(i, seed, os.path.join(directory, f"{i:06d}.jpg"))


def make_images(root: Path, n: int, seed: int = 0) -> Path:
    """root/photos-N: N photographs (see the module docstring), made once and kept."""
    out = root / f"photos-{n}"
    if out.is_dir():
        return out
    tmp = root / f"_photos-{n}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t = time.perf_counter()
    step = 500
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        jobs = [pool.submit(_photos, a, min(n, a + step), seed, str(tmp)) for a in range(0, n, step)]
        for j in jobs:
            j.result()
    tmp.rename(out)
    say(f"made {n} photographs in {out} ({time.perf_counter() - t:.0f} s)")
    return out


# ---------------------------------------------------------------------------------------------------------
# The model, for the baselines (numpy and torch are imported only in the children)


def _proj() -> Any:
    """FakeEmbedPatches' projection: default_rng(0), (P·P·3, embedding + classes), float32."""
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.standard_normal((PATCH * PATCH * 3, EMBED_DIM + NUM_CLASSES)).astype(np.float32)


def top_k(logits: Any, k: int = TOPK) -> tuple[Any, Any]:
    """The k largest logits' classes (int32, best first) and their softmax probabilities (float32)."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float32)
    idx = np.argsort(-x, axis=1, kind="stable")[:, :k]
    e = np.exp(x - x.max(axis=1, keepdims=True))
    scores = np.take_along_axis(e, idx, axis=1) / e.sum(axis=1, keepdims=True)
    return idx.astype(np.int32), scores.astype(np.float32)


class Model:
    """`trivial` or `vit_ti_16` on a batch of 224×224 crops: uint8 (B, H, W, 3) or, as torchvision's
    ToTensor + Normalize make them, normalized float32 (B, 3, H, W). Returns the output columns."""

    def __init__(self, model: str) -> None:
        self.model = model
        if model == "trivial":
            self.proj = _proj()
        else:
            from vit.checkpoints import load_model

            self.vit = load_model(model, "random", seed=0).model.eval()

    def __call__(self, images: Any) -> dict[str, Any]:
        import numpy as np

        if self.model == "trivial":
            if images.dtype == np.uint8:
                x = images.astype(np.float32) / 255.0  # (B, H, W, 3)
            else:  # undo Normalize: back to ToTensor's [0, 1], channels last
                mean, std = np.array(MEAN, np.float32), np.array(STD, np.float32)
                x = images.transpose(0, 2, 3, 1) * std + mean
            g = CROP // PATCH
            mean_patch = x.reshape(len(x), g, PATCH, g, PATCH, 3).mean(axis=(1, 3)).reshape(len(x), -1)
            out = mean_patch.astype(np.float32) @ self.proj
            emb, logits = out[:, :EMBED_DIM], out[:, EMBED_DIM:]
        else:
            import torch

            x = torch.from_numpy(np.ascontiguousarray(images))
            if x.dtype == torch.uint8:  # (B, H, W, 3) → ToTensor + Normalize
                x = x.permute(0, 3, 1, 2).float().div(255)
                x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
            with torch.inference_mode():
                cls, lg = self.vit(x)
            emb, logits = cls.numpy(), lg.numpy()
        classes, scores = top_k(logits)
        return {"embedding": emb, "logits": logits, "top_classes": classes, "top_scores": scores}


# ---------------------------------------------------------------------------------------------------------
# The children: one run each, the last stdout line a JSON object


def child_ours(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.config import JobConfig
    from pipeline.embed import FakeEmbedPatches
    from pipeline.run import run

    imports = time.monotonic() - _T0
    config = JobConfig(input=args.input, output=args.output, model="vit_ti_16", weights="random")
    kwargs = {"embedding_dim": EMBED_DIM, "num_classes": NUM_CLASSES}
    summary = run(config, embedder=FakeEmbedPatches, embedder_kwargs=kwargs)
    summary.startup = {"imports": round(imports, 3), **summary.startup}
    return summary.to_json()


class RayDocsModel:
    """The docs' model class: built once per actor, called on batches of preprocessed images."""

    def __init__(self, model: str) -> None:
        self.model = Model(model)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"path": batch["path"], **self.model(batch["image"])}


def child_raydocs(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import torchvision.transforms as T
    from PIL import Image

    imports = time.monotonic() - _T0
    t = time.monotonic()
    ray.init(include_dashboard=False)
    started = time.monotonic() - t
    transform = T.Compose([T.Resize(RESIZE), T.CenterCrop(CROP), T.ToTensor(), T.Normalize(MEAN, STD)])

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {"path": row["path"], "image": transform(Image.fromarray(row["image"])).numpy()}

    t = time.monotonic()
    ds = ray.data.read_images(args.input, mode="RGB", include_paths=True)
    ds = ds.map(preprocess)
    ds = ds.map_batches(
        RayDocsModel,
        fn_constructor_kwargs={"model": args.model},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=BATCH,
        num_cpus=1,
    )
    ds.write_parquet(args.output)
    return {
        "startup": {"imports": round(imports, 3), "ray": round(started, 3)},
        "run_s": time.monotonic() - t,
    }


def child_daft(args: argparse.Namespace) -> dict[str, Any]:
    import daft
    import numpy as np
    import pyarrow as pa
    from daft import DataType, col

    imports = time.monotonic() - _T0
    # Resize(256) of a 500×375 image: the short side to 256, the long one to int(256 × 500 / 375) = 341, as
    # torchvision computes it; CenterCrop(224): torchvision's rounding of the offsets.
    w, h = int(RESIZE * WIDTH / HEIGHT), RESIZE
    left, top = round((w - CROP) / 2), round((h - CROP) / 2)
    fsl = DataType.fixed_size_list
    out_type = DataType.struct(
        {
            "embedding": fsl(DataType.float32(), EMBED_DIM),
            "logits": fsl(DataType.float32(), NUM_CLASSES),
            "top_classes": fsl(DataType.int32(), TOPK),
            "top_scores": fsl(DataType.float32(), TOPK),
        }
    )

    # One instance, as the others have one model actor. Daft's default made two here, built at once in two
    # threads: random weights drawn from torch's global generator at once differ (see the docstring).
    @daft.cls(max_concurrency=1)
    class DaftModel:
        def __init__(self, model: str) -> None:
            self.model = Model(model)

        @daft.method.batch(return_dtype=out_type, unnest=True, batch_size=BATCH)
        def __call__(self, images: daft.Series) -> pa.Array:
            out = self.model(np.stack(images.to_pylist()))
            arrays = [
                pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1]) for v in out.values()
            ]
            return pa.StructArray.from_arrays(arrays, names=list(out))

    t = time.monotonic()
    df = daft.from_glob_path(os.path.join(args.input, "*.jpg"))
    df = df.with_column("image", col("path").download().decode_image(mode="RGB"))
    df = df.with_column("image", col("image").resize(w, h).crop((left, top, CROP, CROP)))
    df = df.select("path", DaftModel(args.model)(col("image")))
    written = df.write_parquet(args.output)
    return {
        "startup": {"imports": round(imports, 3)},
        "run_s": time.monotonic() - t,
        "files": len(written.to_pydict().get("path", [])),
    }


CHILDREN = {"ours": child_ours, "raydocs": child_raydocs, "daft": child_daft}


# ---------------------------------------------------------------------------------------------------------
# Running and measuring


def say(text: str) -> None:
    print(text, file=sys.stderr if _JSON_MODE else sys.stdout, flush=True)


_JSON_MODE = False


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def data_files(out: Path, committed_only: bool) -> list[Path]:
    """The Parquet data files under `out`: for ours the committed ones (top level only), else any not under
    a `_`- or `.`-prefixed directory."""
    if not out.is_dir():
        return []
    if committed_only:
        try:
            with os.scandir(out) as it:
                return [
                    Path(e.path)
                    for e in it
                    if e.name.endswith(".parquet") and not e.name.startswith(("_", ".")) and e.is_file()
                ]
        except FileNotFoundError:
            return []
    found = []
    for d, dirs, files in os.walk(out):
        dirs[:] = [x for x in dirs if not x.startswith(("_", "."))]
        found += [Path(d) / f for f in files if f.endswith(".parquet") and not f.startswith(("_", "."))]
    return found


def _children_of() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(pid: int) -> set[int]:
    kids, out, todo = _children_of(), set(), [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            if k not in out:
                out.add(k)
                todo.append(k)
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all but idle and iowait) since boot."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / _TICK


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def reap(pids: set[int]) -> int:
    """Waits for the processes a child started (Ray's) to exit; kills, by id, those left after
    LEFTOVER_WAIT_S. Returns how many had to be killed."""
    deadline = time.monotonic() + LEFTOVER_WAIT_S
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    for p in left:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    return len(left)


def child_command(args: argparse.Namespace, system: str, model: str, src: Path, out: Path) -> list[str]:
    io = ["--input", str(src), "--output", str(out)]
    if system == "ours" and model != "trivial":  # the job's command itself
        return [sys.executable, str(ROOT / "jobs" / "embed.py"), *io, "--model", model, "--weights", "random"]
    python = args.daft_python if system == "daft" else sys.executable
    return [python, str(Path(__file__).resolve()), "--child", system, "--model", model, *io]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network from here: no usage report either
    env.setdefault("DAFT_ANALYTICS_ENABLED", "0")
    return env


def measure(
    args: argparse.Namespace, system: str, model: str, n: int, src: Path, work: Path, r: int
) -> dict[str, Any]:
    out = work / f"out-{system}-{model}-{n}-{r}"
    shutil.rmtree(out, ignore_errors=True)
    log = work / f"log-{system}-{model}-{n}-{r}.txt"
    cmd = child_command(args, system, model, src, out)
    committed_only = system == "ours"
    load_before = load_average()
    done = threading.Event()
    ended: list[float] = []
    seen: set[int] = set()
    cpu: dict[int, float] = {}
    busy0 = machine_busy_seconds()
    with log.open("wb") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(), cwd=str(ROOT))

        def wait() -> None:
            try:
                proc.wait(timeout=args.timeout_s)
            except subprocess.TimeoutExpired:
                for p in descendants(proc.pid) | {proc.pid}:
                    with contextlib.suppress(OSError):
                        os.kill(p, signal.SIGKILL)
                proc.wait()
            ended.append(time.perf_counter())
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        first: float | None = None
        last_scan = 0.0
        while not done.wait(POLL_S):
            now = time.perf_counter()
            if first is None and data_files(out, committed_only):
                first = now - start
            if now - last_scan > SCAN_S:  # its processes: their CPU time, and to wait for them afterwards
                seen |= descendants(proc.pid)
                for p in seen | {proc.pid}:
                    c = cpu_seconds(p)
                    if c is not None:
                        cpu[p] = c
                last_scan = now
        seconds = ended[0] - start
    busy = machine_busy_seconds() - busy0
    if first is None and data_files(out, committed_only):
        first = seconds
    load_after = load_average()
    killed = reap(seen)
    text = log.read_text(errors="replace")
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("{")]
    try:
        report = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        report = {}
    files = data_files(out, committed_only)
    rows, errors, emb = count_rows(files, system)
    rec: dict[str, Any] = {
        "system": system,
        "model": model,
        "images": n,
        "round": r,
        "rc": proc.returncode,
        "seconds": round(seconds, 2),
        "first_file_s": None if first is None else round(first, 2),
        "rows": rows,
        "error_rows": errors,
        "files": len(files),
        "ok": proc.returncode == 0 and rows == n and not errors,
        "load_before": load_before,
        "load_after": load_after,
        "cpu_s": round(sum(cpu.values()), 1),
        "other_cpu_s": round(max(0.0, busy - sum(cpu.values())), 1),
        "startup": report.get("startup", {}),
        "leftover_processes_killed": killed,
        "command": " ".join(cmd),
    }
    if system == "ours":
        rec["summary_seconds"] = report.get("seconds")
    if proc.returncode != 0 or rows != n:
        rec["log_tail"] = text[-3000:]
    if args.keep_work:
        rec["output"] = str(out)
    else:
        shutil.rmtree(out, ignore_errors=True)
    return rec | {"_emb": emb}


def _matrix(column: Any) -> Any:
    """A list / fixed-size-list / tensor-extension column of equal-length float vectors → (rows, dim)."""
    import numpy as np
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    if not (
        pa.types.is_list(arr.type)
        or pa.types.is_fixed_size_list(arr.type)
        or pa.types.is_large_list(arr.type)
    ):
        raise TypeError(f"not a list column: {arr.type}")
    n = len(arr)
    flat = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return flat.reshape(n, -1) if n else flat.reshape(0, 0)


def count_rows(files: list[Path], system: str) -> tuple[int, int, dict[str, Any] | None]:
    """Rows in `files`; error rows (ours: `error` set); {file name: embedding} to compare systems."""
    import numpy as np
    import pyarrow.parquet as pq

    rows = errors = 0
    names: list[str] = []
    embs = []
    for f in files:
        pf = pq.ParquetFile(f)
        rows += pf.metadata.num_rows
        key = "key" if system == "ours" else "path"
        cols = [key, "embedding"] + (["error"] if system == "ours" else [])
        try:
            t = pf.read(columns=cols)
        except Exception as e:  # rows are counted; the comparison is skipped
            say(f"  could not read {key}/embedding of {f.name}: {e}")
            return rows, errors, None
        if system == "ours":
            errors += t.num_rows - t["error"].null_count
        names += [os.path.basename(str(k)) for k in t[key].to_pylist()]
        embs.append(_matrix(t["embedding"]))
    if not embs:
        return rows, errors, None
    return rows, errors, {"names": names, "embedding": np.concatenate(embs)}


def agreement(ours: dict[str, Any] | None, other: dict[str, Any] | None) -> float | None:
    """The smallest cosine similarity between `other`'s embedding of a file and ours of the same file."""
    import numpy as np

    if not ours or not other:
        return None
    index = {k: i for i, k in enumerate(ours["names"])}
    pairs = [(index[k], j) for j, k in enumerate(other["names"]) if k in index]
    if not pairs:
        return None
    a = ours["embedding"][[i for i, _ in pairs]]
    b = other["embedding"][[j for _, j in pairs]]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return round(float(cos.min()), 4)


def daft_check(python: str | None) -> tuple[str | None, str]:
    """(python, versions) when Daft can run, else (None, why not)."""
    if not python:
        return None, (
            "Daft skipped: no --daft-python given (a virtualenv with daft, numpy and pillow that also sees "
            "this venv's torch; see the docstring)."
        )
    code = (
        "import daft, torch, pyarrow, numpy; print(daft.__version__, pyarrow.__version__, torch.__version__)"
    )
    try:
        res = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=120, env=child_env()
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"Daft skipped: {python} could not be run ({e})."
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"Daft skipped: {python} cannot import daft, torch, pyarrow and numpy ({last})."
    d, pa_, torch_ = res.stdout.split()
    return python, f"daft {d} (pyarrow {pa_}, torch {torch_})"


def versions() -> str:
    parts = []
    for name in ("ray", "torch", "torchvision", "pyarrow", "numpy", "pillow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            parts.append(f"{name} {metadata.version(name)}")
    return ", ".join(parts)


def machine() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal")))
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{cpu or 'unknown CPU'}, {os.cpu_count()} CPUs{mem}"


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def table(records: list[dict[str, Any]]) -> str:
    ours = {(r["model"], r["images"], r["round"]): r for r in records if r["system"] == "ours"}
    head = (
        "| model | images | system | round | total s | images/s | first file s | rows | ok | total ÷ ours "
        "| first file ÷ ours | cos vs ours (min) | CPU s | other CPU s | load before → after |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        base = ours.get((r["model"], r["images"], r["round"]))
        ratio = first_ratio = None
        if base and r["system"] != "ours" and base["ok"] and r["ok"]:
            ratio = r["seconds"] / base["seconds"]
            if r["first_file_s"] and base["first_file_s"]:
                first_ratio = r["first_file_s"] / base["first_file_s"]
        lines.append(
            f"| {r['model']} | {r['images']:,} | {r['system']} | {r['round'] + 1} | {r['seconds']:.1f} | "
            f"{r['rows'] / r['seconds']:.0f} | {_fmt(r['first_file_s'])} | {r['rows']:,} | "
            f"{'yes' if r['ok'] else 'NO'} | {_fmt(ratio, '.2f')} | {_fmt(first_ratio, '.2f')} | "
            f"{_fmt(r.get('cos_vs_ours'), '.4f')} | {_fmt(r.get('cpu_s'), '.0f')} | "
            f"{_fmt(r.get('other_cpu_s'), '.0f')} | {r['load_before']:.2f} → {r['load_after']:.2f} |"
        )
    return "\n".join(lines)


def summary_lines(records: list[dict[str, Any]]) -> list[str]:
    """Medians over rounds of each baseline's ratios, and where ours' start went."""
    out = []
    keys = sorted({(r["model"], r["images"]) for r in records}, key=lambda k: (MODELS.index(k[0]), k[1]))
    for model, n in keys:
        rs = [r for r in records if (r["model"], r["images"]) == (model, n)]
        ours = {r["round"]: r for r in rs if r["system"] == "ours" and r["ok"]}
        for system in SYSTEMS[1:]:
            ratios = [
                r["seconds"] / ours[r["round"]]["seconds"]
                for r in rs
                if r["system"] == system and r["ok"] and r["round"] in ours
            ]
            if ratios:
                out.append(
                    f"{model}, {n:,} images: {system} took {statistics.median(ratios):.2f}× ours' total time "
                    f"(median over {len(ratios)} round(s))"
                )
        for r in rs:
            if r["startup"]:
                s = ", ".join(f"{k} {v:.1f}" for k, v in r["startup"].items())
                out.append(f"{model}, {n:,} images, {r['system']}, round {r['round'] + 1}: start (s): {s}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: ours, raydocs, daft")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: trivial, vit_ti_16")
    p.add_argument(
        "--sizes",
        default=None,
        help="comma-separated image counts for every model (default: trivial 2000,20000; vit_ti_16 2000)",
    )
    p.add_argument("--rounds", type=int, default=1, help="runs of each system per size (default: 1)")
    p.add_argument("--daft-python", default=None, help="the Daft virtualenv's python (without it: no Daft)")
    p.add_argument(
        "--images-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "vit-embed-baselines",
        help="cache of the image sets, photos-N/ (default: %(default)s)",
    )
    p.add_argument(
        "--workdir", type=Path, default=None, help="outputs and child logs (default: a temp dir, removed)"
    )
    p.add_argument("--keep-work", action="store_true", help="keep the outputs and logs")
    p.add_argument("--seed", type=int, default=0, help="seed of the image set (default: 0)")
    p.add_argument("--pause-s", type=float, default=5.0, help="pause between runs (default: %(default)s)")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="a run is killed after this long")
    p.add_argument("--json", action="store_true", help="print the results as JSON (progress on stderr)")
    p.add_argument(
        "--report",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="run nothing: print the table of the results that earlier --json runs saved in these files",
    )
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [s for s in args.systems if s not in SYSTEMS] + [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"unknown system or model: {', '.join(bad)}")
    if args.sizes:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    global _JSON_MODE
    args = parse_args(argv)
    if args.child:
        report = CHILDREN[args.child](args)
        print(json.dumps(report))
        return 0
    _JSON_MODE = args.json
    if args.report:
        saved = [json.loads(f.read_text()) for f in args.report]
        for f, d in zip(args.report, saved):
            print(
                f"{f}: " + "; ".join(f"{k} {d[k]}" for k in ("date", "machine", "python", "daft") if k in d)
            )
        print_report([r for d in saved for r in d["runs"]])
        return 0
    daft_python, daft_text = (None, "Daft not asked for.")
    if "daft" in args.systems:
        daft_python, daft_text = daft_check(args.daft_python)
        if daft_python is None:
            say(daft_text)
            args.systems = [s for s in args.systems if s != "daft"]
    if "ours" not in args.systems:
        say("ours is not among --systems: no ratios or cosine comparison.")
    order = [s for s in SYSTEMS if s in args.systems]
    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "python": f"Python {sys.version.split()[0]}; {versions()}",
        "daft": daft_text,
    }
    for k, v in header.items():
        say(f"{k}: {v}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-baselines-"))
    work.mkdir(parents=True, exist_ok=True)
    args.images_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    try:
        for model in args.models:
            for n in args.sizes or DEFAULT_SIZES[model]:
                src = make_images(args.images_dir, n, args.seed)
                for r in range(args.rounds):
                    turn = order[r % len(order) :] + order[: r % len(order)]  # rotated each round
                    embs: dict[str, Any] = {}
                    for system in turn:
                        rec = measure(args, system, model, n, src, work, r)
                        embs[system] = rec.pop("_emb")
                        records.append(rec)
                        say(
                            f"{model} {n} {system} round {r + 1}: {rec['seconds']:.1f} s, first file "
                            f"{_fmt(rec['first_file_s'])} s, {rec['rows']} rows (rc {rec['rc']}), load "
                            f"{rec['load_before']:.2f} → {rec['load_after']:.2f}"
                            + (
                                ""
                                if rec["ok"]
                                else f"\n  NOT OK; the child's output ends:\n{rec.get('log_tail', '')}"
                            )
                        )
                        time.sleep(args.pause_s)
                    for rec in records[-len(turn) :]:
                        if rec["system"] != "ours":
                            rec["cos_vs_ours"] = agreement(embs.get("ours"), embs.get(rec["system"]))
    finally:
        if args.workdir is None and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    result = {**header, "images_dir": str(args.images_dir), "runs": records}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(records)
    return 0 if all(r["ok"] for r in records) else 1


def print_report(records: list[dict[str, Any]]) -> None:
    print()
    print(table(records))
    print()
    for line in summary_lines(records):
        print(line)


if __name__ == "__main__":
    sys.exit(main())
