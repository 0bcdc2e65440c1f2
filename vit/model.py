"""torchvision's Vision Transformer (Dosovitskiy et al., 2020), written for batch inference.

Parameter names are torchvision's own (`conv_proj`, `class_token`, `encoder.pos_embedding`,
`encoder.layers.encoder_layer_{i}.…`, `encoder.ln`, `heads.…`), so a torchvision state dict loads with
`strict=True` and no converter (old `linear_1`/`linear_2` MLP names included). Two entry points, both
returning `(cls_embedding [B, D], logits [B, C] | None)`:

    forward(images)            float [B, 3, H, W], already normalized as torchvision's transforms do
    forward_patches(patches)   uint8 [B, N, P·P·3] as `vit.preprocess.patchify` lays them out (kh, kw, c);
                               (x/255 − mean)/std is folded into the patch projection, so the
                               accelerator receives uint8 and one matmul normalizes and projects.

The CLS embedding is token 0 after the final LayerNorm, before any head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vit.preprocess import unpatchify

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LEGACY_MLP_NAMES = {"linear_1": "0", "linear_2": "3"}  # MLP's Linears in torchvision < 0.13 checkpoints


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224  # the size the position embedding is laid out for
    patch_size: int = 16
    num_layers: int = 12
    num_heads: int = 12
    hidden_dim: int = 768
    mlp_dim: int = 3072
    num_classes: int = 1000  # 0: no head, forward returns logits=None
    representation_size: int | None = None  # pre_logits Linear → tanh before the head
    layer_norm_eps: float = 1e-6  # torchvision/timm 1e-6; Hugging Face defaults to 1e-12

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3

    def gmacs(self) -> float:
        """Multiply-accumulates per image, in billions (ViT-B/16 at 224: 17.56, as torchvision lists)."""
        n, d, m = self.num_patches + 1, self.hidden_dim, self.mlp_dim
        per_layer = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * m  # qkv, QKᵀ and AV, out, MLP
        head = 0
        if self.num_classes:
            r = self.representation_size
            head = d * r + r * self.num_classes if r else d * self.num_classes
        return (self.num_patches * self.patch_dim * d + self.num_layers * per_layer + head) / 1e9


PRESETS: dict[str, ViTConfig] = {
    # torchvision's builders
    "vit_b_16": ViTConfig(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "vit_b_32": ViTConfig(patch_size=32, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "vit_l_16": ViTConfig(patch_size=16, num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096),
    "vit_l_32": ViTConfig(patch_size=32, num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096),
    "vit_h_14": ViTConfig(patch_size=14, num_layers=32, num_heads=16, hidden_dim=1280, mlp_dim=5120),
    # the two small standard ones (DeiT / timm "tiny" and "small")
    "vit_ti_16": ViTConfig(patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768),
    "vit_s_16": ViTConfig(patch_size=16, num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536),
}


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (fused q;k;v `in_proj`)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3D)
        q, k, v = qkv.view(B, N, 3, self.num_heads, D // self.num_heads).permute(
            2, 0, 3, 1, 4
        )  # (B, H, N, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class MLP(nn.Sequential):
    """Linear → GELU → Linear, named `0` and `3` like torchvision's MLP (whose slot 2 is a dropout)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, dim))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # So that `load_state_dict` takes old torchvision state dicts as they are.
        for old, new in LEGACY_MLP_NAMES.items():
            for kind in ("weight", "bias"):
                if f"{prefix}{old}.{kind}" in state_dict:
                    state_dict[f"{prefix}{new}.{kind}"] = state_dict.pop(f"{prefix}{old}.{kind}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_dim, eps=cfg.layer_norm_eps)
        self.self_attention = SelfAttention(cfg.hidden_dim, cfg.num_heads)
        self.ln_2 = nn.LayerNorm(cfg.hidden_dim, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_dim, cfg.mlp_dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D) → (B, N, D)
        x = x + self.self_attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, cfg.num_patches + 1, cfg.hidden_dim))
        blocks: OrderedDict[str, nn.Module] = OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(cfg)) for i in range(cfg.num_layers)
        )
        self.layers = nn.Sequential(blocks)
        self.ln = nn.LayerNorm(cfg.hidden_dim, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:  # (B, N+1, D) → (B, N+1, D)
        return self.ln(self.layers(x + self.pos_embedding))


class VisionTransformer(nn.Module):
    def __init__(
        self, config: ViTConfig, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        super().__init__()
        self.config = config
        D = config.hidden_dim
        self.conv_proj = nn.Conv2d(3, D, kernel_size=config.patch_size, stride=config.patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, D))
        self.encoder = Encoder(config)
        heads: OrderedDict[str, nn.Module] = OrderedDict()
        if config.num_classes > 0:
            if config.representation_size is not None:
                heads["pre_logits"] = nn.Linear(D, config.representation_size)
                heads["act"] = nn.Tanh()
                D = config.representation_size
            heads["head"] = nn.Linear(D, config.num_classes)
        self.heads = nn.Sequential(heads)
        # Pixel normalization for forward_patches; not persistent, so state dicts stay torchvision's.
        self.register_buffer("pixel_mean", torch.empty(3), persistent=False)
        self.register_buffer("pixel_std", torch.empty(3), persistent=False)
        self.set_normalization(mean, std)
        self._init_weights()

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        device = self.class_token.device if not self.class_token.is_meta else None
        self.pixel_mean = torch.tensor([float(m) for m in mean], dtype=torch.float32, device=device)
        self.pixel_std = torch.tensor([float(s) for s in std], dtype=torch.float32, device=device)

    @torch.no_grad()
    def _init_weights(self) -> None:
        # Random weights are only for tests and dry runs; checkpoints overwrite all of this.
        fan_in = self.conv_proj.in_channels * self.config.patch_size**2
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)  # type: ignore[arg-type]
        nn.init.normal_(self.encoder.pos_embedding, std=0.02)
        for m in self.modules():
            if isinstance(m, SelfAttention):
                nn.init.xavier_uniform_(m.in_proj_weight)
            if isinstance(m, nn.Linear):  # heads too: torchvision zero-inits them, making logits vacuous
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        _, C, H, W = images.shape
        S = self.config.image_size
        torch._assert(
            C == 3 and H == S and W == S, f"expected images (B, 3, {S}, {S}), got {tuple(images.shape)}"
        )
        x = self.conv_proj(images)  # (B, D, gh, gw)
        return self._encode(x.flatten(2).transpose(1, 2))  # (B, N, D)

    def forward_patches(self, patches: Tensor, exact: bool = False) -> tuple[Tensor, Tensor | None]:
        """uint8 patches (B, N, P·P·3) → (CLS, logits). The normalization is folded into the patch
        projection (one matmul); `exact`: normalized first and projected by the convolution, in
        torchvision's order of operations (`ToTensor`, `Normalize`, `conv_proj`), for outputs that match
        torchvision's to float32 rounding."""
        N, K = self.config.num_patches, self.config.patch_dim
        torch._assert(
            patches.dim() == 3 and patches.shape[1] == N and patches.shape[2] == K,
            f"expected patches (B, {N}, {K}), got {tuple(patches.shape)}",
        )
        if exact:
            grid = self.config.image_size // self.config.patch_size
            images = unpatchify(patches, self.config.patch_size, grid).permute(0, 3, 1, 2)  # (B, 3, H, W)
            x = images.to(self.conv_proj.weight.dtype).div(255)
            mean, std = (v.to(x.dtype).view(1, 3, 1, 1) for v in (self.pixel_mean, self.pixel_std))
            return self.forward(x.sub(mean).div(std))
        weight, bias = self.folded_patch_projection()  # (D, P·P·3), (D,)
        return self._encode(F.linear(patches.to(weight.dtype), weight, bias))  # (B, N, D)

    def folded_patch_projection(self) -> tuple[Tensor, Tensor]:
        """`conv_proj` as a Linear on raw (kh, kw, c) uint8 patches: conv(norm(x)) = x @ Wᵀ + b."""
        w = self.conv_proj.weight.permute(0, 2, 3, 1)  # (D, P, P, 3): (kh, kw, c) like the patches
        scale = 1.0 / (255.0 * self.pixel_std)  # norm(x) = x·scale + shift, per channel
        shift = -self.pixel_mean / self.pixel_std
        weight = (w * scale.to(w.dtype)).reshape(w.shape[0], -1)
        shifted = (w * shift.to(w.dtype)).sum(dim=(1, 2, 3))  # (D,)
        bias = self.conv_proj.bias + shifted  # type: ignore[operator]
        return weight, bias

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:  # x: (B, N, D) patch embeddings
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N+1, D)
        cls = self.encoder(x)[:, 0]  # (B, D), after the final LayerNorm
        logits = self.heads(cls) if self.config.num_classes > 0 else None  # (B, C)
        return cls, logits


def build_model(
    preset: str, *, image_size: int | None = None, num_classes: int | None = None, **overrides: object
) -> VisionTransformer:
    """A randomly initialized preset; `image_size`, `num_classes` and any ViTConfig field override it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if image_size is not None:
        overrides["image_size"] = image_size
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    return VisionTransformer(dataclasses.replace(PRESETS[preset], **overrides))  # type: ignore[arg-type]


def autocast(device: torch.device | str, dtype: str | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU (the default there), fp32 on CPU unless `dtype="bf16"` is asked for."""
    device_type = torch.device(device).type
    if dtype is None:
        dtype = "bf16" if device_type == "cuda" else "fp32"
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype != "bf16":
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def compile_model(model: VisionTransformer, **compile_kwargs: object) -> VisionTransformer:
    """Compiles both entry points in place with torch.compile (the first call of each shape is slow)."""
    model.forward = torch.compile(model.forward, **compile_kwargs)  # type: ignore[method-assign,call-overload]
    model.forward_patches = torch.compile(model.forward_patches, **compile_kwargs)  # type: ignore[method-assign,call-overload]
    return model
