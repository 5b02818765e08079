"""DHVT: a ViT with convolutional inductive bias, for training from scratch on small data sets.

Lu, Xie, Liu, Zhang, "Bridging the Gap Between Vision Transformers and Convolutional Neural
Networks on Small Datasets" (NeurIPS 2022; arXiv 2210.05958). The Dynamic Hybrid Vision
Transformer keeps the plain, non-hierarchical ViT (pre-norm blocks, a CLS token, a linear
head on it) and changes three parts:

- **SOPE**, sequential overlapping patch embedding (Sec. 3.1): ``k = log2(P)`` 3x3 stride-2
  convolutions with BatchNorm and GELU replace the P x P patchify conv, between two learned
  per-channel affine maps ``alpha * x + beta`` (alpha = 1, beta = 0 at init), one on the
  image, one on the embedded grid. Neighbouring patches overlap, so no pixel border is lost.
- **DAFF**, dynamic aggregation feed-forward (Sec. 3.2): the MLP of each block becomes
  1x1 conv - BN - GELU, a 3x3 depthwise conv - BN - GELU with a shortcut around it, and
  1x1 conv - BN over the patch tokens laid out on their grid (so each token mixes with its
  neighbours; this replaces the position embedding, which DHVT drops). The class token skips
  the convolutions: it is re-scaled channel-wise by a squeeze-excitation of the block's patch
  output (mean over patches -> Linear(D, D/4) -> GELU -> Linear(D/4, D)).
- **HI-MHSA**, head-interacted multi-head self-attention with **head tokens** (Sec. 3.3):
  before attention, the input's channels are split into the h heads' groups; each group is
  averaged over the tokens and projected to a full-width "head token" (Linear(D/h, D), then
  LayerNorm over each D/h slice and GELU, plus a learned embedding per head token). The h head
  tokens join the sequence for that block's attention only; afterwards their mean is added to
  the class token and they are dropped.

Components, as paper / the authors' code (github.com/ArieSeirack/DHVT, vision_transformer.py) /
here; "as code" means the same computation (checked: with the same weights the authors' module
and this one give the same logits to float32 precision; docs/dhvt.md has the table):

- patch embedding. Paper: SOPE, k = log2 P stride-2 3x3 convs + BN + GELU. Code: patch 2, 4
  and 16 only; widths D/2^(k-1-i) (patch 16: D/8, D/4, D/2, D); convs without bias;
  SyncBatchNorm; GELU between convs, not after the last, except for patch 2 (conv, BN, GELU).
  Here: any power-of-two patch >= 2 with the same widths and GELU placement; BatchNorm2d.
- affine maps. Paper and code: before and after SOPE, alpha = 1, beta = 0 at init; the code's
  input map has 3 channels whatever the image. Here: as code, on the image's own channels.
- image size. Paper: 32 px (CIFAR), 224 px. Code: square only (grid side sqrt(N)). Here: any
  H x W; SOPE's grid shape (ceil(s / 2) per stage) is passed to every DAFF.
- position embedding. Paper: removed. Code: none. Here: none.
- DAFF. Paper: FFN with a depthwise conv, a shortcut, SE on the class token. Code:
  conv1x1 (D -> 4D) + BN + GELU; + [dwconv 3x3 + BN + GELU]; conv1x1 (4D -> D) + BN; convs
  with bias; SE from the mean of that output, Linear(D, D/4) - GELU - Linear(D/4, D), no
  sigmoid; the class token (the normed block input) times that weight; its dropout unused.
  Here: as code (the SE pair is timm's ``Mlp``).
- head tokens. Paper: each head's channel group pooled, projected, joined to the attention,
  merged into the class token. Code: the mean over all tokens (CLS included) of each D/h group;
  Linear(D/h, D); LayerNorm over each D/h slice; GELU; + a learned (1, h, D) embedding
  (trunc-normal 0.02); after the output projection CLS += the mean of the head-token outputs;
  projection dropout after the merge. Here: as code.
- attention, block, final norm. Code: qkv bias on, scale (D/h)^-1/2; pre-norm blocks with
  LayerNorm eps 1e-6; drop-path rate linear in depth; no pre-logits. Here: as code (timm
  ``DropPath``; ``F.scaled_dot_product_attention`` computes the same softmax attention).
- initialisation. Code: Linear trunc-normal 0.02 and bias 0, norms 1 / 0, convs PyTorch's
  default, CLS trunc-normal 0.02. Here: as code, except the classifier heads, which are clsim's
  growing heads with PyTorch's Linear default (grown rows too), as for every clsim model.
- distillation token. Paper: none. Code: ``distilled=True`` is broken (an undefined name, and a
  second prefix token would break DAFF's square reshape). Here (``dhvt_distilled``): DIST after
  CLS; both are class tokens (DAFF re-scales both by the SE weight, both get the head-token
  mean); a second growing head on DIST, the mean of the two at inference (DeiT's rule).
- weight decay. Code: none on cls/dist tokens, biases and 1-D parameters. Here: clsim's engine
  decays every parameter, as for ``vit`` and ``deit``.

The recipe of the paper's CIFAR-100 runs (run_code_cifar.sh, main.py defaults): AdamW lr 1e-3,
weight decay 0.05, batch 256 per GPU x 2, 300 epochs with 5 warm-up, cosine, drop path 0.1,
RandAugment m9, Mixup 0.8 / CutMix 1.0, label smoothing 0.1, random erasing 0.25, repeated
augmentation. This module is the architecture only; ``drop_path_rate`` defaults to 0 like the
other clsim ViTs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

from clsim.errors import ConfigError
from clsim.models.deit import DistilledIncrementalClassifier
from clsim.models.heads import IncrementalClassifier
from clsim.models.timm_models import _default_patch
from clsim.registry import MODELS

Grid = tuple[int, int]
"""(rows, columns) of the patch-token grid."""


# --------------------------------------------------------------------------- SOPE


class Affine(nn.Module):
    """Per-channel ``alpha * x + beta`` on ``(B, C, H, W)``, the identity at initialisation."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha + self.beta


def sope_widths(patch_size: int, embed_dim: int) -> list[int]:
    """Output channels of SOPE's ``log2(patch_size)`` convs: ..., D/4, D/2, D (code: 16 -> D/8 ... D)."""
    stages = int(math.log2(patch_size))
    return [embed_dim // 2 ** (stages - 1 - i) for i in range(stages)]


class SOPE(nn.Module):
    """Sequential overlapping patch embedding: ``(B, C, H, W)`` -> tokens ``(B, N, D)`` and their grid.

    Each stage is a 3x3 stride-2 conv (padding 1, no bias) and BatchNorm; GELU follows every
    stage but the last, and the last too when there is one stage (the public code's patch-2
    case). Each stage maps a side s to ceil(s / 2), so H x W images give
    ``N = ceil(H / P) * ceil(W / P)`` tokens for patch P = 2^k.
    """

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        widths = sope_widths(patch_size, embed_dim)
        layers: list[nn.Module] = []
        width = in_chans
        for i, out in enumerate(widths):
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out)]
            if i < len(widths) - 1 or len(widths) == 1:
                layers.append(nn.GELU())
            width = out
        self.pre_affine = Affine(in_chans)
        self.proj = nn.Sequential(*layers)
        self.post_affine = Affine(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        x = self.post_affine(self.proj(self.pre_affine(x)))  # (B, D, Hp, Wp)
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid  # (B, Hp * Wp, D), row-major


# --------------------------------------------------------------------------- DAFF


class DAFF(nn.Module):
    """Dynamic aggregation feed-forward on ``[prefix tokens, patch tokens]`` ``(B, T + N, D)``.

    Patch tokens go through pointwise - depthwise (with a shortcut) - pointwise convolutions on
    their grid; each of the ``num_prefix`` class tokens (CLS, and DIST in the distilled model)
    is multiplied channel-wise by the squeeze-excitation of the patch output.
    """

    def __init__(self, dim: int, hidden: int, *, num_prefix: int, kernel_size: int = 3):
        super().__init__()
        self.num_prefix = num_prefix
        self.conv1 = nn.Conv2d(dim, hidden, 1)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size, padding=(kernel_size - 1) // 2, groups=hidden)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, dim, 1)
        self.bn3 = nn.BatchNorm2d(dim)
        self.act = nn.GELU()
        # the code's compress / excitation pair, reduction 4, no sigmoid gate
        self.excite = Mlp(dim, dim // 4, dim, act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        B, _, D = x.shape
        prefix, patches = x[:, : self.num_prefix], x[:, self.num_prefix:]  # (B, T, D), (B, N, D)
        h = patches.transpose(1, 2).reshape(B, D, *grid)  # (B, D, Hp, Wp): token n at (n // Wp, n % Wp)
        h = self.act(self.bn1(self.conv1(h)))  # (B, hidden, Hp, Wp)
        h = h + self.act(self.bn2(self.conv2(h)))  # the shortcut around the depthwise conv
        h = self.bn3(self.conv3(h))  # (B, D, Hp, Wp)
        weight = self.excite(h.mean(dim=(2, 3)))  # (B, D): squeeze over the grid, excite
        prefix = prefix * weight[:, None]  # (B, T, D)
        return torch.cat([prefix, h.flatten(2).transpose(1, 2)], dim=1)  # (B, T + N, D)


# --------------------------------------------------------------------------- HI-MHSA


class HeadInteractedAttention(nn.Module):
    """Multi-head self-attention with one head token per head (HI-MHSA), ``(B, T + N, D)`` in and out."""

    def __init__(self, dim: int, num_heads: int, *, num_prefix: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.num_prefix, self.attn_drop = num_heads, num_prefix, attn_drop
        head_dim = dim // num_heads
        self.head_proj = nn.Linear(head_dim, dim)
        self.head_norm = nn.LayerNorm(head_dim)  # over each D/h slice of a head token (code: eps 1e-5)
        self.head_embed = nn.Parameter(trunc_normal_(torch.zeros(1, num_heads, dim), std=0.02))
        self.act = nn.GELU()
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def head_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, h, D)``: head i from channel group i averaged over every token (CLS included, as code)."""
        B, T, D = x.shape
        h = self.num_heads
        groups = x.reshape(B, T, h, D // h).mean(dim=1)  # (B, h, D/h)
        tokens = self.head_proj(groups).reshape(B, h, h, D // h)  # (B, h, D) seen as h slices of D/h
        tokens = self.act(self.head_norm(tokens)).reshape(B, h, D)
        return tokens + self.head_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        h = self.num_heads
        seq = torch.cat([x, self.head_tokens(x)], dim=1)  # (B, T + h, D)
        q, k, v = self.qkv(seq).reshape(B, T + h, 3, h, D // h).permute(2, 0, 3, 1, 4)  # each (B, h, T+h, D/h)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = self.proj(out.transpose(1, 2).reshape(B, T + h, D))  # (B, T + h, D)
        tokens, heads = out[:, :T], out[:, T:]
        merged = heads.mean(dim=1, keepdim=True)  # (B, 1, D): into every class token
        p = self.num_prefix
        out = torch.cat([tokens[:, :p] + merged, tokens[:, p:]], dim=1)  # (B, T, D)
        return self.proj_drop(out)


# --------------------------------------------------------------------------- the network


class DHVTBlock(nn.Module):
    """``x + DropPath(HI-MHSA(LN(x)))``, then ``x + DropPath(DAFF(LN(x)))``."""

    def __init__(self, dim: int, num_heads: int, *, num_prefix: int, mlp_ratio: float, qkv_bias: bool,
                 drop: float, attn_drop: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = HeadInteractedAttention(dim, num_heads, num_prefix=num_prefix, qkv_bias=qkv_bias,
                                            attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = DAFF(dim, int(dim * mlp_ratio), num_prefix=num_prefix)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x), grid))


class DHVT(nn.Module):
    """The DHVT backbone, headless: images ``(B, C, H, W)`` -> class-token features ``(B, D)``.

    :meth:`forward_features` gives every token after the final norm, ``[CLS, (DIST,) patches]``
    ``(B, T + N, D)``; ``num_features`` and ``head_drop`` follow timm's ViTs, so
    :class:`~clsim.models.deit.DistilledIncrementalClassifier` reads a distilled DHVT as it
    reads timm's distilled DeiT.
    """

    def __init__(self, *, in_chans: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, distilled: bool = False):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix = 2 if distilled else 1
        self.patch_embed = SOPE(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth, linear in depth
        self.blocks = nn.ModuleList(
            DHVTBlock(embed_dim, num_heads, num_prefix=self.num_prefix, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      drop=drop_rate, attn_drop=attn_drop_rate, drop_path=rate)
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Identity()  # the code has no dropout before the head
        self._init_weights()

    def _init_weights(self) -> None:
        """As the public code: tokens and Linear weights trunc-normal 0.02, biases 0, norms 1 / 0."""
        for token in (self.cls_token, self.dist_token):
            if token is not None:
                trunc_normal_(token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Every token after the final norm, ``(B, T + N, D)``; T = 1 (CLS) or 2 (CLS, DIST)."""
        patches, grid = self.patch_embed(x)  # (B, N, D)
        B = patches.shape[0]
        prefix = [self.cls_token] + ([self.dist_token] if self.dist_token is not None else [])
        x = torch.cat([t.expand(B, -1, -1) for t in prefix] + [patches], dim=1)  # no position embedding
        for block in self.blocks:
            x = block(x, grid)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class-token features ``(B, D)``: CLS, or the mean of CLS and DIST (DeiT's pre-logits)."""
        tokens = self.forward_features(x)
        return tokens[:, : self.num_prefix].mean(dim=1)


# --------------------------------------------------------------------------- factories


def dhvt_backbone(
    input_shape: tuple[int, int, int], *, patch_size: int | None, embed_dim: int, depth: int, num_heads: int,
    mlp_ratio: float, qkv_bias: bool, drop_rate: float, attn_drop_rate: float, drop_path_rate: float,
    distilled: bool,
) -> DHVT:
    """A :class:`DHVT` for ``(C, H, W)`` images; bad sizes are :class:`ConfigError` naming the key."""
    channels, height, width = input_shape
    # as the vit factory: 16 at 224 px, 4 at 32 px, 2 at 16 and 8 px (never 1: SOPE needs a stage)
    patch = patch_size if patch_size is not None else max(2, _default_patch(min(height, width)))
    if patch < 2 or patch & (patch - 1):
        raise ConfigError("model.patch_size", f"expected a power of two >= 2 (SOPE has log2(patch) stride-2 "
                                              f"convs), got {patch}")
    for key, value in [("depth", depth), ("num_heads", num_heads)]:
        if value < 1:
            raise ConfigError(f"model.{key}", f"expected an int >= 1, got {value}")
    if embed_dim < 4 or embed_dim % num_heads or embed_dim // 2 ** (int(math.log2(patch)) - 1) < 1:
        raise ConfigError("model.embed_dim", f"expected a multiple of num_heads ({num_heads}), >= 4 (DAFF's "
                                             f"D/4 excitation) and >= patch/2 (SOPE's widths), got {embed_dim}")
    if mlp_ratio <= 0:
        raise ConfigError("model.mlp_ratio", f"expected a number > 0, got {mlp_ratio}")
    for key, value in [("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                       ("drop_path_rate", drop_path_rate)]:
        if not 0 <= value < 1:
            raise ConfigError(f"model.{key}", f"expected a number in [0, 1), got {value}")
    return DHVT(in_chans=channels, patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                drop_path_rate=drop_path_rate, distilled=distilled)


@MODELS.register("dhvt")
def dhvt(
    input_shape: tuple[int, int, int], /, *,
    patch_size: int | None = None,
    embed_dim: int = 192,
    depth: int = 12,
    num_heads: int = 4,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> IncrementalClassifier:
    """DHVT (Lu et al. 2022): SOPE conv patch embedding, DAFF, head tokens; no position embedding.

    The defaults are DHVT-T (dhvt_tiny_cifar_patch4: 192 wide, 12 blocks, 4 heads); DHVT-S is
    ``embed_dim: 384, num_heads: 8``.

    Args:
        patch_size: a power of two; SOPE stacks log2 of it stride-2 convs. Default as for vit:
            the largest of 16, 8, 4, 2 leaving an 8x8 grid (4 at 32 px), else a 4x4 grid, else 2.
        embed_dim: token width D.
        depth: number of blocks.
        num_heads: attention heads, and head tokens, per block.
        mlp_ratio: DAFF hidden width / D.
        qkv_bias: bias on the query, key and value projections.
        drop_rate: dropout after the attention's output projection.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth rate of the last block (linear from 0; the paper's runs: 0.1).
    """
    backbone = dhvt_backbone(input_shape, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate,
                             attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, distilled=False)
    return IncrementalClassifier(backbone, backbone.num_features)


@MODELS.register("dhvt_distilled")
def dhvt_distilled(
    input_shape: tuple[int, int, int], /, *,
    patch_size: int | None = None,
    embed_dim: int = 192,
    depth: int = 12,
    num_heads: int = 4,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> DistilledIncrementalClassifier:
    """DHVT with a DeiT distillation token: CLS and DIST heads (mean at inference), a DeiT-LT student.

    The same options as ``dhvt``. DIST is a second class token: DAFF re-scales it and the head
    tokens feed it exactly as CLS; ``forward_both`` gives ``(cls_logits, dist_logits)``.
    """
    backbone = dhvt_backbone(input_shape, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate,
                             attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, distilled=True)
    return DistilledIncrementalClassifier(backbone)
