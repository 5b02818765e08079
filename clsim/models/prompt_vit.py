"""Prompted ViTs: a frozen timm VisionTransformer steered by prefix prompts (L2P, DualPrompt, CODA-P).

Three registered models, one per prompting method, because a strategy names the one model it
trains (``required_model``):

- ``l2p_vit``: "Learning to Prompt for Continual Learning" (Wang et al., CVPR 2022) as the
  CODA-Prompt code base and "A Closer Look at Rehearsal-Free CL" (Smith et al. 2023) run it,
  "L2P++": a pool of ``pool_size`` prompts with learnable keys, the ``top_k`` keys nearest (cosine)
  to the query are selected and their prompts enter as *prefixes* (prefix-tuning) at layer 0.
- ``dualprompt_vit``: "DualPrompt" (Wang et al., ECCV 2022): a G-prompt shared by all tasks at
  layers 0-1 and one E-prompt per task (with a key) at layers 2-4, prefix-tuning.
- ``coda_prompt_vit``: "CODA-Prompt" (Smith et al., CVPR 2023): per layer (0-4) components P,
  keys K and attention vectors A; the prompt is ``sum_m alpha_m P_m`` with
  ``alpha_m = cos(q * A_m, K_m)``; components are allocated per task, earlier ones frozen.

The query is the frozen backbone's pre-logits feature ([CLS] after the final norm) from a
forward pass without prompts, computed without gradient (as the CODA-Prompt code does). Prefix
attention (:func:`prefix_attention`) concatenates a prompt's first half (keys) and second half
(values) to every head's K and V before the softmax; the prefixes are K/V vectors as they are,
not passed through the qkv projection (the CODA-Prompt code; Li & Liang 2021's prefix-tuning).

Works with any timm ``VisionTransformer`` whose blocks are timm's standard ``Block`` (any width,
heads, depth, patch). The backbone is *not* frozen here: the strategies freeze it (``setup``).

Differences from the public code (each documented in docs/prompting.md):

- L2P/DualPrompt keys: one key set per pool, shared by the prompted layers (as the original
  google-research/l2p code); the CODA-Prompt code keeps a key set per layer, each trained to the
  same query with the same loss. With L2P++'s single layer the two are the same.
- L2P pull loss: ``sum_b sum_{m in topk(b)} (1 - cos(q_b, k_m))``; the CODA-Prompt code indexes
  ``cos_sim[:, k_idx]`` with a (B, k) index, which sums over *all* (query, other query's key)
  pairs, B times larger and pulling each query toward every other sample's keys.
- Gram-Schmidt: new components are made orthogonal to the span of the earlier ones (the code
  sums one-row projections, exact only while the earlier rows are still orthogonal, i.e. not after
  training); a component that cannot be made orthogonal (more components than dimensions, as in
  tiny test models) stays a random unit vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clsim.errors import ConfigError
from clsim.models.heads import IncrementalClassifier
from clsim.models.timm_models import create_backbone, vit_options
from clsim.registry import MODELS

Prefix = tuple[torch.Tensor, torch.Tensor]
"""``(keys, values)`` prefixes of one layer, each ``(B, L_prefix, embed_dim)``."""

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


# --------------------------------------------------------------------------- prefix attention

def prefix_attention(attn: nn.Module, x: torch.Tensor, prefix: Prefix | None) -> torch.Tensor:
    """timm ``Attention.forward`` with ``prefix`` keys/values prepended to every head's K and V.

    ``x`` is ``(B, N, C)``; a prefix of ``(B, L, C)`` is split into the heads like the tokens'
    keys and values, so each head attends over ``L + N`` keys (prefix-tuning, Li & Liang 2021,
    as the CODA-Prompt code's ``Attention.forward(prompt=...)``).
    """
    B, N, _ = x.shape
    H, hd = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if prefix is not None:
        pk, pv = (p.reshape(B, -1, H, hd).transpose(1, 2) for p in prefix)  # (B, H, L, hd)
        k = torch.cat((attn.k_norm(pk), k), dim=2)
        v = torch.cat((pv, v), dim=2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, H * hd))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def prefixed_block(block: nn.Module, x: torch.Tensor, prefix: Prefix | None) -> torch.Tensor:
    """timm ``Block.forward`` whose attention takes ``prefix`` (see :func:`prefix_attention`)."""
    x = x + block.drop_path1(block.ls1(prefix_attention(block.attn, block.norm1(x), prefix)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def check_vit(vit: nn.Module) -> None:
    """``vit`` is a timm VisionTransformer with standard blocks (the prompts need their parts)."""
    blocks = getattr(vit, "blocks", None)
    ok = blocks is not None and all(hasattr(b, p) for b in blocks for p in _BLOCK_PARTS) \
        and all(hasattr(b.attn, "qkv") and hasattr(b.attn, "head_dim") for b in blocks)
    if not ok:
        raise ConfigError("model.arch", f"{type(vit).__name__} is not a timm VisionTransformer with standard "
                                        f"attention blocks (qkv projection); prompts need one")


# --------------------------------------------------------------------------- prompt modules

def _uniform(*shape: int) -> nn.Parameter:
    """A prompt/key tensor initialised U[0, 1), as the CODA-Prompt code's ``tensor_prompt``."""
    return nn.Parameter(torch.rand(*shape))


def _split(prompts: torch.Tensor) -> Prefix:
    """``(..., L, D)`` prompts -> their first half as prefix keys, second half as values."""
    half = prompts.shape[-2] // 2
    return prompts[..., :half, :], prompts[..., half:, :]


def cosine(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``(B, D) x (M, D) -> (B, M)`` cosine similarities."""
    return F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).T


class PromptModule(nn.Module):
    """A prompt method: from the query, the prefixes of each prompted layer and its raw losses.

    ``layers`` are the block indices that take prefixes; the buffer ``task`` is the index of
    the task being learnt (set by the strategy's ``before_task`` through :meth:`start_task`).
    """

    kind = ""
    layers: tuple[int, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("task", torch.zeros((), dtype=torch.long))

    def start_task(self, index: int) -> None:
        """Learning task ``index`` begins (idempotent: a federated client calls it every round)."""
        self.task.fill_(index)

    def forward(self, query: torch.Tensor, train: bool) -> tuple[dict[int, Prefix], dict[str, torch.Tensor]]:
        raise NotImplementedError


class L2PPool(PromptModule):
    """L2P's prompt pool: ``pool_size`` prompts of ``length`` tokens with keys; top-``top_k``.

    The selected prompts of each prompted layer are concatenated: ``top_k * length / 2`` prefix
    keys and as many values. Loss ``pull``: ``sum_b sum_{m in topk(b)} (1 - cos(q_b, k_m))``, the
    surrogate loss that pulls the selected keys toward their queries (L2P eq. 5).
    """

    kind = "l2p"

    def __init__(self, dim: int, *, pool_size: int, length: int, top_k: int, layers: Sequence[int]):
        super().__init__()
        self.layers, self.top_k = tuple(layers), top_k
        self.keys = _uniform(pool_size, dim)
        self.prompts = _uniform(len(self.layers), pool_size, length, dim)

    def select(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices (B, top_k), cosine (B, pool))``: the pool's keys nearest to each query."""
        sim = cosine(query.detach(), self.keys)
        return sim.topk(self.top_k, dim=1).indices, sim

    def forward(self, query, train):
        idx, sim = self.select(query)
        B = len(query)
        chosen = self.prompts[:, idx]  # (layers, B, top_k, L, D)
        pk, pv = (p.reshape(len(self.layers), B, -1, p.shape[-1]) for p in _split(chosen))
        prefixes = {layer: (pk[i], pv[i]) for i, layer in enumerate(self.layers)}
        losses = {"pull": (1.0 - sim.gather(1, idx)).sum()} if train else {}
        return prefixes, losses


class DualPromptPool(PromptModule):
    """DualPrompt: a G-prompt (``g_length``) at ``g_layers``, E-prompts (``length``) at ``e_layers``.

    One E-prompt and key per task (``pool_size`` >= the number of tasks). Training uses the
    task's own E-prompt and pulls its key toward the queries (loss ``pull``:
    ``sum_b (1 - cos(q_b, k_task))``); evaluation picks the E-prompt of the nearest key (top-1),
    no task id. At a layer with both, E's prefixes come first (the CODA-Prompt code's order).
    """

    kind = "dualprompt"

    def __init__(self, dim: int, *, pool_size: int, length: int, g_length: int,
                 g_layers: Sequence[int], e_layers: Sequence[int]):
        super().__init__()
        self.g_layers, self.e_layers = tuple(g_layers), tuple(e_layers)
        self.layers = tuple(sorted(set(self.g_layers) | set(self.e_layers)))
        self.keys = _uniform(pool_size, dim)
        self.prompts = _uniform(len(self.e_layers), pool_size, length, dim)
        self.g_prompts = _uniform(len(self.g_layers), g_length, dim) if self.g_layers else None

    def start_task(self, index: int) -> None:
        if index >= len(self.keys):
            raise ConfigError("model.pool_size", f"DualPrompt keeps one E-prompt per task: task {index + 1} "
                                                 f"needs pool_size >= {index + 1}, got {len(self.keys)}")
        super().start_task(index)

    def select(self, query: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index (B,), cosine (B, pool))``: the task's E-prompt in training, else the nearest key's."""
        sim = cosine(query.detach(), self.keys)
        if train:
            return self.task.expand(len(query)), sim
        return sim.argmax(dim=1), sim

    def forward(self, query, train):
        idx, sim = self.select(query, train)
        B = len(query)
        e_k, e_v = _split(self.prompts[:, idx])  # (e_layers, B, L/2, D)
        parts: dict[int, list[Prefix]] = {}
        for i, layer in enumerate(self.e_layers):
            parts.setdefault(layer, []).append((e_k[i], e_v[i]))
        for i, layer in enumerate(self.g_layers):
            g_k, g_v = _split(self.g_prompts[i].expand(B, -1, -1))
            parts.setdefault(layer, []).append((g_k, g_v))
        prefixes = {layer: (torch.cat([k for k, _ in p], 1), torch.cat([v for _, v in p], 1))
                    for layer, p in parts.items()}
        losses = {"pull": (1.0 - sim[:, self.task]).sum()} if train else {}
        return prefixes, losses


def gram_schmidt(vectors: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``vectors`` (M, d) with rows ``start:stop`` replaced by random unit vectors orthogonal to
    every earlier row and to each other (the CODA-Prompt code's per-task re-initialisation).

    Rows before ``start`` are kept as they are; rows from ``stop`` on are zero (not allocated
    yet). Each new row is orthogonalised against the *span* of all rows before it (an SVD basis:
    earlier tasks' trained components are no longer orthogonal to each other, where the code's
    sum of one-row projections would leave a residual). A row that cannot be made orthogonal
    (no dimension left, e.g. more components than a tiny model's width) stays a random unit vector.
    """
    out = torch.zeros_like(vectors)
    out[:start] = vectors[:start]
    for k in range(start, stop):
        v = torch.randn_like(vectors[k])
        if k:
            u, sv, _ = torch.linalg.svd(out[:k].T, full_matrices=False)  # (d, r): the span's basis
            basis = u[:, sv > 1e-6 * sv.max().clamp_min(1e-12)]
            residual = v - basis @ (basis.T @ v)
            v = residual if residual.norm() > 1e-4 * v.norm() else v
        out[k] = v / v.norm()
    return out


def ortho_penalty(t: torch.Tensor) -> torch.Tensor:
    """``mean((t t^T - I)^2)`` over the rows of ``t`` (M, d): CODA-P's orthogonality loss."""
    return ((t @ t.T - torch.eye(len(t), device=t.device, dtype=t.dtype)) ** 2).mean()


class CodaPool(PromptModule):
    """CODA-Prompt: per prompted layer, ``pool_size`` components P (length x dim), keys K, attention A.

    ``alpha_m = cos(q * A_m, K_m)`` (CODA-P eq. 3-4) and the layer's prompt ``sum_m alpha_m P_m``,
    split into prefix keys/values. Task t owns components ``[t*c, (t+1)*c)``, ``c = pool/n_tasks``;
    evaluation uses all components so far, training the current task's plus the earlier ones
    detached (no gradient reaches them). Loss ``ortho``: the orthogonality penalty of K, A and
    the flattened P of the components in use, summed over layers (CODA-P eq. 5, unweighted).
    """

    kind = "coda"

    def __init__(self, dim: int, *, pool_size: int, length: int, layers: Sequence[int], n_tasks: int):
        super().__init__()
        self.layers, self.n_tasks = tuple(layers), n_tasks
        self.per_task = pool_size // n_tasks
        n = len(self.layers)
        self.prompts = nn.Parameter(torch.zeros(n, pool_size, length, dim))
        self.keys = nn.Parameter(torch.zeros(n, pool_size, dim))
        self.attention = nn.Parameter(torch.zeros(n, pool_size, dim))
        self.register_buffer("allocated", torch.zeros((), dtype=torch.long))  # tasks given components
        self.allocate(0)

    def span(self, task: int) -> tuple[int, int]:
        """Components ``[start, stop)`` of task ``task``."""
        return task * self.per_task, (task + 1) * self.per_task

    @torch.no_grad()
    def allocate(self, task: int) -> None:
        """Gram-Schmidt-initialise the components of every task up to ``task`` not yet allocated."""
        for t in range(int(self.allocated), task + 1):
            start, stop = self.span(t)
            for param in (self.keys, self.attention, self.prompts):
                for i in range(len(self.layers)):
                    flat = param[i].reshape(param.shape[1], -1)
                    param[i] = gram_schmidt(flat, start, stop).reshape(param[i].shape)
        self.allocated.fill_(max(int(self.allocated), task + 1))

    def start_task(self, index: int) -> None:
        if index >= self.n_tasks:
            raise ConfigError("model.n_tasks", f"CODA-Prompt allocates components for n_tasks={self.n_tasks} "
                                               f"tasks; task {index + 1} needs n_tasks >= {index + 1}")
        super().start_task(index)
        self.allocate(index)

    def components(self, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(P, K, A)`` in use: components ``[0, stop)``, the earlier tasks' detached in training."""
        start, stop = self.span(int(self.task))
        parts = []
        for p in (self.prompts, self.keys, self.attention):
            if train and start > 0:
                parts.append(torch.cat((p[:, :start].detach(), p[:, start:stop]), dim=1))
            else:
                parts.append(p[:, :stop])
        return tuple(parts)

    @staticmethod
    def weights(query: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """``alpha (layers, B, M)``: ``cos(q * A_m, K_m)`` per layer and component."""
        attended = torch.einsum("bd,lmd->lbmd", query, attention)
        return torch.einsum("lbmd,lmd->lbm", F.normalize(attended, dim=-1), F.normalize(keys, dim=-1))

    def forward(self, query, train):
        P, K, A = self.components(train)
        alpha = self.weights(query.detach(), K, A)
        pk, pv = _split(torch.einsum("lbm,lmtd->lbtd", alpha, P))  # (layers, B, L/2, D)
        prefixes = {layer: (pk[i], pv[i]) for i, layer in enumerate(self.layers)}
        losses = {}
        if train:
            losses["ortho"] = sum(ortho_penalty(K[i]) + ortho_penalty(A[i]) + ortho_penalty(P[i].flatten(1))
                                  for i in range(len(self.layers)))
        return prefixes, losses


# --------------------------------------------------------------------------- the model

class PromptedViT(nn.Module):
    """A timm ViT and a prompt module: ``forward(x)`` gives the prompted pre-logits features.

    The query pass runs the same ViT without prompts and without gradient.
    """

    def __init__(self, vit: nn.Module, prompt: PromptModule):
        super().__init__()
        check_vit(vit)
        self.vit = vit
        self.prompt = prompt

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's feature of ``x`` without prompts, ``(B, D)``."""
        return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)

    def encode(self, x: torch.Tensor, prefixes: dict[int, Prefix]) -> torch.Tensor:
        """The ViT's pre-logits features with ``prefixes`` at their layers."""
        vit = self.vit
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for i, block in enumerate(vit.blocks):
            h = prefixed_block(block, h, prefixes[i]) if i in prefixes else block(h)
        return vit.forward_head(vit.norm(h), pre_logits=True)

    def forward_with_losses(self, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(features, the prompt module's raw losses)``; ``train`` picks the training selection."""
        prefixes, losses = self.prompt(self.query(x), train)
        return self.encode(x, prefixes), losses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_losses(x, self.training)[0]


class PromptClassifier(IncrementalClassifier):
    """:class:`IncrementalClassifier` over a :class:`PromptedViT` (``backbone.vit``, ``backbone.prompt``)."""

    backbone: PromptedViT

    @property
    def prompt(self) -> PromptModule:
        return self.backbone.prompt

    def logits_and_losses(self, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(logits, the prompt's raw losses)`` of one prompted pass (``train``: training selection)."""
        features, losses = self.backbone.forward_with_losses(x, train)
        return self.head(features), losses


# --------------------------------------------------------------------------- factories

def _check_size(key: str, value: int, low: int, what: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"model.{key}", f"expected an int >= {low}{what}, got {value!r}")


def _check_length(key: str, value: int) -> None:
    _check_size(key, value, 2)
    if value % 2:
        raise ConfigError(f"model.{key}", f"expected an even length (half prefix keys, half values), got {value}")


def _layers(key: str, layers: Sequence[int] | None, default: Sequence[int], depth: int, *,
            allow_empty: bool = False) -> tuple[int, ...]:
    """Explicit layers, each in ``[0, depth)``; ``None``: the paper's ``default`` that the depth has."""
    if layers is None:
        return tuple(i for i in default if i < depth)
    layers = tuple(layers)
    bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < depth]
    if bad or len(set(layers)) != len(layers) or not (layers or allow_empty):
        raise ConfigError(f"model.{key}", f"expected a non-empty list of distinct block indices in "
                                          f"[0, {depth}) (the model's depth), "
                                          f"got {list(layers)}")
    return layers


def _build_vit(input_shape, arch, patch_size, embed_dim, depth, num_heads, mlp_ratio, pretrained) -> nn.Module:
    sizing = vit_options(input_shape, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path_rate=0.0)
    vit = create_backbone(arch, pretrained, global_pool="token", class_token=True, **sizing)
    check_vit(vit)
    return vit


def _classifier(vit: nn.Module, prompt: PromptModule, pretrained: bool | str) -> PromptClassifier:
    return PromptClassifier(PromptedViT(vit, prompt), vit.num_features, pretrained=pretrained is not False)


@MODELS.register("l2p_vit")
def l2p_vit(
    input_shape: tuple[int, int, int], /, *,
    arch: str = "vit_tiny_patch16_224",
    patch_size: int | None = None, embed_dim: int | None = None, depth: int | None = None,
    num_heads: int | None = None, mlp_ratio: float | None = None,
    pretrained: bool | str = False,
    pool_size: int = 30, prompt_length: int = 20, top_k: int = 5,
    prompt_layers: list[int] | None = None,
) -> PromptClassifier:
    """A timm ViT with an L2P prompt pool (L2P++: prefix-tuning, Smith et al. 2023's setting).

    Args:
        arch, patch_size, embed_dim, depth, num_heads, mlp_ratio, pretrained: the ViT, as ``vit``.
        pool_size: prompts in the pool (M; CODA-Prompt code's L2P++: 30).
        prompt_length: tokens per prompt, half prefix keys and half values (L_p: 20).
        top_k: prompts selected per image (N: 5).
        prompt_layers: blocks that take the prefixes (default [0], L2P++ "shallow").
    """
    vit = _build_vit(input_shape, arch, patch_size, embed_dim, depth, num_heads, mlp_ratio, pretrained)
    _check_size("pool_size", pool_size, 1)
    _check_length("prompt_length", prompt_length)
    _check_size("top_k", top_k, 1)
    if top_k > pool_size:
        raise ConfigError("model.top_k", f"expected at most pool_size ({pool_size}) prompts, got {top_k}")
    layers = _layers("prompt_layers", prompt_layers, (0,), len(vit.blocks))
    prompt = L2PPool(vit.num_features, pool_size=pool_size, length=prompt_length, top_k=top_k, layers=layers)
    return _classifier(vit, prompt, pretrained)


@MODELS.register("dualprompt_vit")
def dualprompt_vit(
    input_shape: tuple[int, int, int], /, *,
    arch: str = "vit_tiny_patch16_224",
    patch_size: int | None = None, embed_dim: int | None = None, depth: int | None = None,
    num_heads: int | None = None, mlp_ratio: float | None = None,
    pretrained: bool | str = False,
    pool_size: int = 10, prompt_length: int = 20, g_length: int = 6,
    g_layers: list[int] | None = None, e_layers: list[int] | None = None,
) -> PromptClassifier:
    """A timm ViT with DualPrompt's G- and E-prompts (prefix-tuning).

    Args:
        arch, patch_size, embed_dim, depth, num_heads, mlp_ratio, pretrained: the ViT, as ``vit``.
        pool_size: E-prompts (one per task, >= the number of tasks; 10 for ImageNet-R).
        prompt_length: E-prompt length, half prefix keys and half values (L_e: 20).
        g_length: G-prompt length (L_g: 6).
        g_layers: blocks with the G-prompt (default [0, 1], those the depth has).
        e_layers: blocks with E-prompts (default [2, 3, 4] that the depth has; a ViT shallower
            than 3 blocks puts them at its last block).
    """
    vit = _build_vit(input_shape, arch, patch_size, embed_dim, depth, num_heads, mlp_ratio, pretrained)
    depth_ = len(vit.blocks)
    _check_size("pool_size", pool_size, 1)
    _check_length("prompt_length", prompt_length)
    _check_length("g_length", g_length)
    g = _layers("g_layers", g_layers, (0, 1), depth_, allow_empty=True)
    e = _layers("e_layers", e_layers, (2, 3, 4), depth_) or (depth_ - 1,)  # only a default can be empty
    prompt = DualPromptPool(vit.num_features, pool_size=pool_size, length=prompt_length, g_length=g_length,
                            g_layers=g, e_layers=e)
    return _classifier(vit, prompt, pretrained)


@MODELS.register("coda_prompt_vit")
def coda_prompt_vit(
    input_shape: tuple[int, int, int], /, *,
    arch: str = "vit_tiny_patch16_224",
    patch_size: int | None = None, embed_dim: int | None = None, depth: int | None = None,
    num_heads: int | None = None, mlp_ratio: float | None = None,
    pretrained: bool | str = False,
    pool_size: int = 100, prompt_length: int = 8, n_tasks: int = 10,
    prompt_layers: list[int] | None = None,
) -> PromptClassifier:
    """A timm ViT with CODA-Prompt's attention-weighted prompt components (prefix-tuning).

    Args:
        arch, patch_size, embed_dim, depth, num_heads, mlp_ratio, pretrained: the ViT, as ``vit``.
        pool_size: components per layer (M: 100), ``pool_size // n_tasks`` per task.
        prompt_length: component length, half prefix keys and half values (L_p: 8).
        n_tasks: tasks the pool is shared among (the stream's number of tasks: 10 for ImageNet-R).
        prompt_layers: blocks with prompts (default [0, 1, 2, 3, 4], those the depth has).
    """
    vit = _build_vit(input_shape, arch, patch_size, embed_dim, depth, num_heads, mlp_ratio, pretrained)
    _check_size("n_tasks", n_tasks, 1)
    _check_size("pool_size", pool_size, n_tasks, f" (at least one component per task, n_tasks={n_tasks})")
    _check_length("prompt_length", prompt_length)
    layers = _layers("prompt_layers", prompt_layers, (0, 1, 2, 3, 4), len(vit.blocks))
    prompt = CodaPool(vit.num_features, pool_size=pool_size, length=prompt_length, layers=layers, n_tasks=n_tasks)
    return _classifier(vit, prompt, pretrained)


__all__ = ["CodaPool", "DualPromptPool", "L2PPool", "PromptClassifier", "PromptedViT", "coda_prompt_vit",
           "cosine", "dualprompt_vit", "gram_schmidt", "l2p_vit", "ortho_penalty", "prefix_attention"]
