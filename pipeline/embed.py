"""Embed: uint8 patches → (CLS embedding, logits, top-k classes), in an actor that builds the ViT once.

`EmbedPatches` is the real stage (weights are loaded inside the actor, never pickled from the driver);
`FakeEmbedPatches` is its cheap deterministic twin with the same batch contract, for pipeline tests and
for measuring the pipeline's own overhead.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.rows import clean_nullable, error_column, ok_mask

log = logging.getLogger(__name__)

# On a GPU a batch is embedded in up to this many pieces so that copying a piece into pinned memory and
# on to the device (CPU memcpy, then a copy engine) overlaps the model's work on the previous piece,
# instead of the GPU waiting for the whole batch's copy. On the CPU there is nothing to overlap: one piece.
CUDA_PIECES = 4
MIN_PIECE_ROWS = 128  # smaller pieces would cost the model more per image than the overlap saves


@dataclass(frozen=True)
class ModelSpec:
    """What an actor needs to build its model: small and picklable."""

    preset: str
    weights: str
    image_size: int | None = None
    seed: int = 0
    class_names: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def load(self):  # -> vit.checkpoints.LoadedModel
        from pipeline.storage import resolve_uri
        from vit.checkpoints import load_model

        return load_model(
            self.preset,
            self.weights,
            image_size=self.image_size,
            seed=self.seed,
            class_names=self.class_names,
            mean=self.mean,
            std=self.std,
            resolve=resolve_uri,  # literal S3 keys, the job's S3 settings and retries
        )


@dataclass(frozen=True)
class Heads:
    """What the model's classification head gives each row: `logits` (the full vector, in its output
    dtype) when `keep_logits`, and the `topk` most probable classes (softmax over the float32 logits)."""

    logits_dtype: str = "float32"
    keep_logits: bool = True
    topk: int = 5

    def columns(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """float32 logits `[B, C]` → the output columns `logits`, `top_classes` (int32 `[B, K]`) and
        `top_scores` (float32 `[B, K]`), K = min(topk, C)."""
        out: dict[str, np.ndarray] = {}
        if self.keep_logits:
            with np.errstate(over="ignore", invalid="ignore"):  # beyond float16: inf, refused later
                out["logits"] = logits.astype(self.logits_dtype)
        k = min(self.topk, logits.shape[1])
        if k > 0:
            out["top_classes"], out["top_scores"] = top_k(logits, k)
        return out


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest logits' classes (int32, best first) and their softmax probabilities (float32)."""
    x = np.asarray(logits, dtype=np.float32)
    if x.shape[1] > k:
        idx = np.argpartition(-x, k - 1, axis=1)[:, :k]
    else:
        idx = np.broadcast_to(np.arange(x.shape[1]), x.shape).copy()
    rows = np.arange(len(x))[:, None]
    order = np.argsort(-x[rows, idx], axis=1, kind="stable")
    idx = idx[rows, order]
    with np.errstate(over="ignore", invalid="ignore"):
        shifted = np.exp(x - x.max(axis=1, keepdims=True))
        probs = shifted[rows, idx] / shifted.sum(axis=1, keepdims=True)
    return idx.astype(np.int32), probs.astype(np.float32)


def _outputs(
    batch: dict[str, np.ndarray],
    embedding: np.ndarray,
    logits: np.ndarray | None,
    heads: Heads,
    seconds: float,
    start_s: float = 0.0,
) -> dict:
    """The batch without its patches, plus the model outputs (`heads.columns` of the float32 `logits`),
    `embed_s` (this batch's model time per row, for the run's per-stage report) and `model_start_s` (the
    actor's start, `start_s`, on the first row of its first batch; zeros elsewhere); other columns pass
    through unchanged."""
    out = clean_nullable({k: v for k, v in batch.items() if k != "patches"})
    n = len(embedding)
    out["embedding"] = embedding
    out["embed_s"] = np.full(n, seconds / max(1, n))
    out["model_start_s"] = np.zeros(n)
    if n:
        out["model_start_s"][0] = start_s
    if logits is not None:
        out.update(heads.columns(logits))
    return out


NON_FINITE_ERROR = (
    "embed: the model produced NaN or infinite values for this image (check --mean/--std, the weights, "
    "and for float16 outputs whether the values exceed its range)"
)


def _refuse_non_finite(
    errors: np.ndarray, embedding: np.ndarray, logits: np.ndarray | None, heads: Heads
) -> None:
    """Rows whose embedding or logits (float32, or their output dtype when written) are not all finite
    become error rows with zero vectors: a NaN or infinite vector is never written as a successful row."""
    bad = ~np.isfinite(embedding).all(axis=1)
    if logits is not None:
        dtype = heads.logits_dtype if heads.keep_logits else "float32"
        with np.errstate(over="ignore", invalid="ignore"):
            bad |= ~np.isfinite(logits.astype(dtype)).all(axis=1)
    bad &= ok_mask(errors)
    if bad.any():
        log.warning("%d of %d rows had NaN or infinite model outputs", int(bad.sum()), len(bad))
        errors[bad] = NON_FINITE_ERROR
        embedding[bad] = 0
        if logits is not None:
            logits[bad] = 0


class EmbedPatches:
    """Ray Data actor stage: `__init__` loads the model once, `__call__` embeds one batch.

    Rows whose `error` is set pass through with zero vectors (the sink writes them as nulls). A failure of
    the model on a batch turns that batch's rows into error rows instead of killing the job, and so does
    a NaN or infinite value in a row's embedding or logits.

    With `decode` set (a dict of pipeline.gpu_decode.GpuDecoder arguments), the batch carries encoded
    `bytes` instead of `patches`: JPEGs are decoded on the actor's device (nvJPEG on a GPU), the rest on
    the CPU path, and that time is reported as the batch's `decode_s`.
    """

    def __init__(
        self,
        spec: ModelSpec,
        embedding_dtype: str = "float32",
        logits_dtype: str = "float32",
        device: str = "auto",
        cpu_threads: int | None = None,
        compile: bool = False,
        decode: dict | None = None,
        pieces: int | None = None,
        keep_logits: bool = True,
        topk: int = 5,
        exact: bool = False,
    ) -> None:
        began = time.perf_counter()
        import torch

        self.exact = exact  # --preprocess exact: the model normalizes in torchvision's order
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and cpu_threads:
            torch.set_num_threads(max(1, int(cpu_threads)))
        self.device = torch.device(device)
        self.pieces = max(1, pieces or (CUDA_PIECES if self.device.type == "cuda" else 1))
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.loaded = spec.load()
        from vit.model import compile_model

        model = self.loaded.model.eval().to(self.device)
        self.model = compile_model(model) if compile else model
        self.embedding_dtype = np.dtype(embedding_dtype)
        self.heads = Heads(logits_dtype, keep_logits, topk)
        self.embedding_dim = self.loaded.model.config.hidden_dim
        self.num_classes = self.loaded.model.config.num_classes
        self.decoder = None
        if decode is not None:
            from pipeline.gpu_decode import GpuDecoder

            self.decoder = GpuDecoder(**decode, device=str(self.device))
        log.info("model %s ready on %s", spec.preset, self.device)
        self._start_s = time.perf_counter() - began  # reported once, with the first batch

    def _started(self) -> float:
        """The actor's start in seconds (torch's import, the weights, the device) the first time; then 0."""
        start_s, self._start_s = self._start_s, 0.0
        return start_s

    def _forward(self, patches: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 patches (numpy, or a tensor already on the device) → numpy embedding and logits.

        The batch goes through the model in up to `self.pieces` pieces: each piece's host→device copy is
        queued on a copy stream while the GPU still works on the previous piece, and results come back
        to the host once, at the end (one synchronization per batch).
        """
        import torch

        from vit.model import autocast

        if isinstance(patches, torch.Tensor):
            x = patches
        else:  # Ray Data hands read-only (zero-copy) arrays; the model only reads its input
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                x = torch.from_numpy(patches)
        # At most `self.pieces` pieces of at least MIN_PIECE_ROWS; one when the patches were decoded on the
        # device (no copy to overlap).
        n = min(self.pieces, max(1, len(x) // MIN_PIECE_ROWS)) if x.device.type == "cpu" else 1
        pieces = x.split(-(-len(x) // n)) if len(x) else (x,)
        outs = []
        with torch.inference_mode(), autocast(self.device):  # bf16 on GPU, fp32 on CPU
            staged = self._to_device(pieces[0])
            for i in range(len(pieces)):
                outs.append(self.model.forward_patches(staged, self.exact))  # on a GPU: queued
                if i + 1 < len(pieces):  # so the next piece is pinned and copied while the GPU works
                    staged = self._to_device(pieces[i + 1])
            cls = torch.cat([c for c, _ in outs]).float().cpu()
            heads = [lg for _, lg in outs if lg is not None]
            logits = torch.cat(heads).float().cpu() if heads else None
        return cls.numpy(), (None if logits is None else logits.numpy())

    def _to_device(self, piece: Any) -> Any:
        """A CPU piece → the device: pinned, copied on the copy stream; the compute stream waits for it."""
        import torch

        if self._copy_stream is None or piece.device.type != "cpu":  # CPU model, or decoded on the GPU
            return piece.to(self.device)
        compute = torch.cuda.current_stream(self.device)
        host = piece.pin_memory()  # the caching host allocator keeps it alive until the copy is done
        with torch.cuda.stream(self._copy_stream):
            on_device = host.to(self.device, non_blocking=True)
        compute.wait_stream(self._copy_stream)  # queued, not waited for here: the host goes on
        on_device.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        return on_device

    def _decode(self, batch: dict[str, np.ndarray], errors: np.ndarray) -> tuple[Any, dict]:
        """Decodes the batch's bytes on the device; rows that fail get their error. Returns the patches
        of the rows that are still fine, and the batch without its bytes plus `decode_s`."""
        assert self.decoder is not None
        start = time.perf_counter()
        import torch

        idx = np.flatnonzero(ok_mask(errors))
        patches, decode_errors = self.decoder([batch["bytes"][i] for i in idx])
        errors[idx] = np.array(decode_errors, dtype=object)
        rest = {k: v for k, v in batch.items() if k != "bytes"}
        sizes = np.full((len(errors), 2), -1, dtype=np.int32)
        for i, size, error in zip(idx, self.decoder.sizes, decode_errors, strict=True):
            if size is not None and error is None:
                sizes[i] = size
        rest["width"], rest["height"] = sizes[:, 0], sizes[:, 1]
        rest["decode_s"] = np.full(len(errors), (time.perf_counter() - start) / max(1, len(errors)))
        return patches[torch.tensor([e is None for e in decode_errors], dtype=torch.bool)], rest

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = error_column(batch)
        if self.decoder is not None:
            patches, batch = self._decode(batch, errors)
        else:
            patches = None
        start = time.perf_counter()
        n = len(batch["key"])
        ok = ok_mask(errors)
        embedding = np.zeros((n, self.embedding_dim), self.embedding_dtype)
        logits = np.zeros((n, self.num_classes), np.float32) if self.num_classes else None
        if ok.any():
            try:
                if patches is None:  # all rows fine (the usual case): no copy of the batch's patches
                    patches = np.ascontiguousarray(batch["patches"] if ok.all() else batch["patches"][ok])
                emb, lg = self._forward(patches)
                with np.errstate(over="ignore", invalid="ignore"):  # beyond float16: inf, refused below
                    embedding[ok] = emb
                    if logits is not None and lg is not None:
                        logits[ok] = lg
            except Exception as e:  # the model failed on this batch: its rows become error rows
                log.exception("embedding a batch of %d images failed", int(ok.sum()))
                errors[ok] = f"embed: {type(e).__name__}: {e}"
        _refuse_non_finite(errors, embedding, logits, self.heads)
        seconds = time.perf_counter() - start
        return _outputs({**batch, "error": errors}, embedding, logits, self.heads, seconds, self._started())


class FakeEmbedPatches:
    """Deterministic stand-in for EmbedPatches: a fixed random projection of the mean patch.

    Same input and output columns, microseconds per image; `delay_s` simulates a slower model.
    """

    def __init__(
        self,
        embedding_dim: int = 192,
        num_classes: int = 10,
        embedding_dtype: str = "float32",
        logits_dtype: str = "float32",
        delay_s: float = 0.0,
        keep_logits: bool = True,
        topk: int = 5,
    ) -> None:
        self.embedding_dim, self.num_classes, self.delay_s = embedding_dim, num_classes, delay_s
        self.embedding_dtype = np.dtype(embedding_dtype)
        self.heads = Heads(logits_dtype, keep_logits, topk)
        self._proj: np.ndarray | None = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        patches = np.asarray(batch["patches"])
        n = len(batch["key"])
        if self._proj is None:
            rng = np.random.default_rng(0)
            width = self.embedding_dim + self.num_classes
            self._proj = rng.standard_normal((patches.shape[-1], width)).astype(np.float32)
        errors = error_column(batch)
        ok = ok_mask(errors)
        mean_patch = patches.reshape(n, -1, patches.shape[-1]).mean(axis=1, dtype=np.float32) / 255.0
        out = (mean_patch @ self._proj) * ok[:, None]
        emb = out[:, : self.embedding_dim]
        logits = out[:, self.embedding_dim :] if self.num_classes else None
        if self.delay_s:
            time.sleep(self.delay_s)
        return _outputs(
            {**batch, "error": errors},
            emb.astype(self.embedding_dtype),
            logits,
            self.heads,
            time.perf_counter() - start,
        )
