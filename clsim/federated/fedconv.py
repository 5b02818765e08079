"""FedConv (Shen et al., "FedConv: A Learning-on-Model Paradigm for Heterogeneous Federated
Clients", MobiSys 2024): the server learns how to shrink the global model and how to grow the
clients' models back.

- Compression (paper Sec. 4.1): per tier, a learned kernel slides over each parameter tensor
  of the global model; a valid convolution yields exactly the sub-model's shape. A ``[out, in]``
  matrix is a one-channel image; a conv weight ``[out, in, kh, kw]`` is kh*kw such images, one
  kernel per spatial position (a grouped convolution); biases and norm parameters are ``1 x n``
  images with 1-D kernels. Kernel sizes are ``G - S + 1`` per side, so where a side keeps its
  size (the first layer's input, the head's classes) the kernel is 1 wide and only the other
  side shrinks. The client trains the result directly.
- Dilation (Sec. 4.2): per client, transposed convolutions with kernels of the same shapes map
  its trained sub-model back to the global shape.
- Aggregation (Sec. 4.3): the dilated models are mixed element-wise with learned weights
  (a softmax over clients for every element), or by the example-weighted mean.
- All three are trained on a public set held by the server (``federated.public_fraction`` of
  each experience's training data, excluded from every client's partition) by the loss of the
  models they produce: the compressed sub-model's, each dilated model's, the aggregate's. The
  weights are a differentiable function of the kernels, evaluated with
  ``torch.func.functional_call``. The budget is the paper's kind: ``epochs`` passes over the
  public set per phase per round (the code: 20, then 10 after round 5, for compression and
  dilation; 20 for aggregation), plus, as the code does, ``finetune`` epochs of the global model
  before compression and ``client_finetune`` epochs of every returned client model before
  dilation (the code: 10 each, Adam 1e-4).
- A validation part of the public set (``val_fraction`` of each class) is never trained on;
  every phase keeps its epoch with the lowest loss on it (:mod:`clsim.federated.public_learning`).

Where this differs from the public code (github.com/lemingshen/FedConv), and why:

- selection on a held-out validation part, never the test set: the code keeps, per phase, the
  epoch with the best test accuracy minus test loss, and re-initialises a phase whose best
  test accuracy is under 40-80%; both read the test set, so its numbers are test-selected.
  Here epoch 0 (the starting point) is a candidate too, so a phase never leaves the server
  worse on the validation part than it found it.
- ``init: delta`` (default): kernels start as a delta at the window's top-left corner, so
  before any learning compression is HeteroFL's static slice and dilation is zero-padding, and
  r = 1 is an exact identity. ``init: paper`` starts from PyTorch's default conv init as the
  code does, and ``activation: mlr`` applies its "modified leaky ReLU" to every produced
  weight. Not reproduced: the code's 1x1 "projection" before each kernel (a scale, absorbed by
  the kernel, and an offset) and its weight-norm reparametrisation (same function class,
  different step geometry); tensors that keep their shape (the head's bias) are passed
  through, where the code gives them a 1x1 kernel and the activation too.
- ``bounded: true`` uses every kernel L1-normalised (:func:`non_expansive`); the default is
  the code's unbounded kernels. Bounded kernels cannot scale a weight up, which a narrower
  sub-model needs (HeteroFL's Scaler does it by 1/r): measured on digits they lower the
  sub-model's validation loss by ~1% where unbounded ones lower it by ~18%
  (tests/test_fedconv_learning.py). Without validation selection, unbounded kernels had drifted
  to large gains over rounds (public-set loss 2.3 -> 1e5 by round 15 at the start of a phase).
- ``lr_scale: none`` (default): one Adam rate for every kernel, as the code. ``window`` gives
  each kernel lr / its window size, the earlier version's rule, under which an entry of a
  57 x 29 kernel moved by ~3e-6 a round: FedConv was HeteroFL plus a rounding error.
- BatchNorm running statistics are buffers, not learnt: sliced to the sub-model and folded back
  per element as in HeteroFL (the public code sends sliced buffers and restores them as 0/1);
  fine-tuning leaves them as they are; validation losses use batch statistics.
- the element-wise aggregation logits start at log(example share) where a client's window holds
  an element and ``UNCOVERED`` below it elsewhere, with the previous global model as one more
  candidate that wins where no client holds an element: the first step is HeteroFL's average.
  They are a softmax, learnt afresh every round (the sampled clients change). The code keeps
  raw per-element weights per position in the round's result list (randn at the start, no
  softmax, ``sum(w * p * n) / sum(n)``) across rounds.
- in continual learning the public set of experience t is the held-out data of experiences
  0..t (the server keeps what it held), so the kernels do not learn to forget old classes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F

import clsim.federated.public_learning as pl
from clsim.errors import ConfigError
from clsim.federated.submodels import aggregate_windows, coverage, slice_state
from clsim.federated.substrategies import SubModelStrategy, Update, num_classes_of
from clsim.registry import SERVER_STRATEGIES
from clsim.seeds import derive_seed

UNCOVERED = -6.0
"""Initial aggregation logit, relative to a covering client's, of a client whose window misses an
element (weight e^-6 ~ 0.25%): learnable, but the first aggregate is HeteroFL's."""

Kernels = dict[str, torch.Tensor]


# ---------------------------------------------------------------------- tensors as images
def _image_dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(P, A, B)``: ``P`` one-channel ``A x B`` images of a parameter of ``shape``."""
    if len(shape) == 1:
        return 1, 1, shape[0]
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    positions = 1
    for s in shape[2:]:
        positions *= s
    return positions, shape[0], shape[1]


def _to_images(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``(1, P, A, B)``: position p of a conv weight is channel p."""
    P, A, B = _image_dims(tuple(t.shape))
    if t.dim() <= 2:
        return t.reshape(1, 1, A, B)
    return t.reshape(A, B, P).permute(2, 0, 1).unsqueeze(0)


def _from_images(img: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`_to_images` for a tensor of ``shape``."""
    if len(shape) <= 2:
        return img.reshape(shape)
    return img[0].permute(1, 2, 0).reshape(shape)


def kernel_shape(global_shape: tuple[int, ...], sub_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """``(P, 1, A - a + 1, B - b + 1)``: a valid convolution maps ``A x B`` images to ``a x b``."""
    P, A, B = _image_dims(global_shape)
    p, a, b = _image_dims(sub_shape)
    if p != P or a > A or b > B:
        raise ValueError(f"cannot compress {global_shape} into {sub_shape}")
    return P, 1, A - a + 1, B - b + 1


def identity_kernel(global_shape: tuple[int, ...], sub_shape: tuple[int, ...]) -> torch.Tensor:
    """A delta at the top-left: compression = the top-left slice, dilation = zero-padding."""
    kernel = torch.zeros(kernel_shape(global_shape, sub_shape))
    kernel[:, :, 0, 0] = 1.0
    return kernel


def compress(t: torch.Tensor, kernel: torch.Tensor, sub_shape: tuple[int, ...]) -> torch.Tensor:
    """Valid grouped convolution of ``t``'s images with ``kernel`` -> a tensor of ``sub_shape``."""
    out = F.conv2d(_to_images(t), kernel, groups=kernel.shape[0])  # (1, P, a, b)
    return _from_images(out, sub_shape)


def non_expansive(kernel: torch.Tensor) -> torch.Tensor:
    """Each position's kernel divided by its L1 norm: a (signed) weighted average, so neither a
    valid nor a transposed convolution with it can grow a weight's magnitude (a delta is unchanged).

    Without it, kernels that persist across rounds and adapt to a tiny public set amplify the
    weights round after round (measured here: public-set loss at a phase's first step from 2.3
    in round 1 to 1e5 by round 15). The public code bounds its kernels with weight
    normalisation; this is the parameter-free version of that bound.
    """
    return kernel / kernel.abs().sum(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)


def dilate(t: torch.Tensor, kernel: torch.Tensor, global_shape: tuple[int, ...]) -> torch.Tensor:
    """Transposed convolution of ``t``'s images with ``kernel`` -> a tensor of ``global_shape``."""
    out = F.conv_transpose2d(_to_images(t), kernel, groups=kernel.shape[0])  # (1, P, A, B)
    return _from_images(out, global_shape)


def paper_kernel(global_shape: tuple[int, ...], sub_shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """The public code's start: PyTorch's default ``Conv2d`` init (kaiming-uniform, a = sqrt(5)),
    i.e. U(-1/sqrt(k), 1/sqrt(k)) for a one-channel kernel of k entries."""
    shape = kernel_shape(global_shape, sub_shape)
    bound = 1.0 / math.sqrt(shape[2] * shape[3])
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def modified_leaky_relu(t: torch.Tensor, negative_slope: float = 0.001, positive_slope: float = 0.85) -> torch.Tensor:
    """The code's "modified leaky ReLU" (``Leaky_Decay_ReLU``, ``config.py``'s slopes), applied to
    every compressed and dilated weight: ``leaky_relu(t, 0.001) - (relu(t) - 0.85 relu(t))``,
    i.e. 0.85 t where t > 0 and 0.001 t elsewhere."""
    return F.leaky_relu(t, negative_slope) - (F.relu(t) - positive_slope * F.relu(t))


# ---------------------------------------------------------------------- the strategy
@SERVER_STRATEGIES.register("fedconv")
class FedConv(SubModelStrategy):
    """FedConv (Shen et al., MobiSys 2024): learned convolutional compression, dilation, aggregation.

    Sub-models are the global weights convolved with learned kernels; the server dilates them
    back by transposed convolution and mixes them with learned element-wise weights, all
    learnt on the server's public set (see the module docstring).

    Args:
        epochs: epochs over the public set's training part per learning phase per round
            (compression per tier, dilation per client, aggregation); the public code runs 20
            (10 after round 5) for compression and dilation, 20 for aggregation. Give this or
            ``steps``.
        steps: instead of ``epochs``, this many random public batches per phase (the bounded
            budget of earlier versions: 5).
        batch_size: public-set examples per batch (the code: 32).
        lr: Adam learning rate of kernels and aggregation logits (the code: 1e-3 for both).
        lr_scale: 'none' (the code: one rate for every kernel) or 'window' (each kernel's rate
            is lr / its window size: kept to reproduce the earlier version, whose kernels
            barely moved).
        init: 'delta' (compression starts as HeteroFL's slice, dilation as zero-padding) or
            'paper' (the code's random kernels, :func:`paper_kernel`).
        activation: 'none' or 'mlr' (the code's :func:`modified_leaky_relu` on every produced weight).
        aggregation: 'learned' (element-wise softmax weights) or 'mean' (example-weighted mean
            of the dilated models).
        weighting: how clients' examples weigh ('examples' or 'uniform'), for both aggregations.
        bounded: use every kernel L1-normalised (:func:`non_expansive`); False uses the raw
            kernels, which drift to large gains over rounds (kept to reproduce that finding).
        client_finetune: epochs of fine-tuning of every client's returned model on the public
            set before dilation (the code's ``pre_train_client``: 10 epochs, Adam 1e-4), at
            ``finetune_lr``. 0: none.
        finetune, finetune_lr, val_fraction, patience: the global model's fine-tuning and the
            validation part every phase selects on (:class:`SubModelStrategy`).
        static_bn: HeteroFL's sBN (:class:`SubModelStrategy`), not FedConv's: an ablation. A
            learnt compression mixes channels, so the statically sliced BN statistics it sends
            are not the compressed model's, nor are the folded ones the dilated global model's;
            with sBN clients train on batch statistics and the global model's are measured.
    """

    uses_public_data = True

    def __init__(self, *, epochs: int | None = None, steps: int | None = None, batch_size: int = 64,
                 lr: float = 1e-3, lr_scale: Literal["none", "window"] = "none",
                 init: Literal["delta", "paper"] = "delta", activation: Literal["none", "mlr"] = "none",
                 aggregation: Literal["learned", "mean"] = "learned",
                 weighting: Literal["examples", "uniform"] = "examples", bounded: bool = False,
                 client_finetune: int = 0, finetune: int = 0, finetune_lr: float = 1e-4,
                 val_fraction: float = 0.2, patience: int | None = None, static_bn: bool = False):
        super().__init__(weighting=weighting, finetune=finetune, finetune_lr=finetune_lr, batch_size=batch_size,
                         val_fraction=val_fraction, patience=patience, static_bn=static_bn)
        if epochs is not None and steps is not None:
            raise ConfigError("federated.server.epochs", f"give either epochs or steps, not both (steps: {steps!r})")
        pl.check_int("epochs", epochs, 0, none=True)
        pl.check_int("steps", steps, 0, none=True)
        pl.check_int("client_finetune", client_finetune, 0)
        pl.check_rate("lr", lr)
        pl.check_choice("lr_scale", lr_scale, ("none", "window"))
        pl.check_choice("init", init, ("delta", "paper"))
        pl.check_choice("activation", activation, ("none", "mlr"))
        pl.check_choice("aggregation", aggregation, ("learned", "mean"))
        if not isinstance(bounded, bool):
            raise ConfigError("federated.server.bounded", f"expected true or false, got {bounded!r}")
        self.epochs = 10 if epochs is None and steps is None else epochs
        self.steps, self.lr, self.lr_scale, self.aggregation = steps, float(lr), lr_scale, aggregation
        self.init, self.activation, self.bounded, self.client_finetune = init, activation, bounded, client_finetune
        self.compression: dict[float, Kernels] = {}  # per tier ratio
        self.dilation: dict[int, Kernels] = {}  # per client
        self.losses: dict[str, tuple[float, float]] = {}  # per phase: (first, last) public-batch loss

    # ------------------------------------------------------------------ compression
    def submodel(self, server_round: int, state: dict[str, torch.Tensor], ratio: float, *,
                 learn: bool = True) -> dict[str, torch.Tensor]:
        """Compress ``state`` for tier ``ratio``, first tuning that tier's kernels on the public set."""
        with pl.server_threads():
            return self._submodel(server_round, state, ratio, learn)

    def _submodel(self, server_round: int, state: dict[str, torch.Tensor], ratio: float,
                  learn: bool) -> dict[str, torch.Tensor]:
        if ratio >= 1.0:
            return dict(state)
        n = num_classes_of(state)
        shapes = self.ctx.shapes(ratio, n)
        kernels = self._kernels(self.compression, ratio, state, shapes)
        model = self.ctx.template(ratio, n)
        if learn:
            compressed = lambda: self._compress(state, kernels, shapes)  # noqa: E731
            loss = lambda x, y: F.cross_entropy(_call(model, compressed(), x), y)  # noqa: E731
            self._fit(f"compress-{ratio:g}", kernels.values(), loss, compressed, model,
                      [server_round, 1, int(ratio * 1e4)])
        with torch.no_grad():
            return {k: v.detach().clone() for k, v in self._compress(state, kernels, shapes).items()}

    def _compress(self, state: dict[str, torch.Tensor], kernels: Kernels, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        out = slice_state(state, shapes)  # buffers and unshrunk tensors: the static window
        for key, kernel in kernels.items():
            out[key] = self._activate(compress(state[key], self._effective(kernel), shapes[key]))
        return out

    # ------------------------------------------------------------------ dilation and aggregation
    def combine(self, server_round: int, state: dict[str, torch.Tensor], updates: list[Update]) -> dict[str, torch.Tensor]:
        """Fine-tune every update on the public set (``client_finetune``), dilate it (tuning each
        client's kernels), then aggregate them."""
        with pl.server_threads():
            return self._combine(server_round, state, updates)

    def _combine(self, server_round: int, state: dict[str, torch.Tensor], updates: list[Update]) -> dict[str, torch.Tensor]:
        n = num_classes_of(state)
        model = self.ctx.template(self.global_ratio, n)
        if self.client_finetune:
            updates = [self._finetune_client(server_round, u, n) for u in updates]
        dilated = [self._dilate_client(server_round, state, u, model) for u in updates]
        names = self._params(model)
        # BatchNorm statistics are measured, not learnt: folded back per element, as in HeteroFL
        buffers = aggregate_windows({k: v for k, v in state.items() if k not in names},
                                    [({k: v for k, v in u.state.items() if k not in names}, self._weight(u), 0)
                                     for u in updates])
        weights = torch.tensor([self._weight(u) for u in updates], dtype=torch.float64)
        weights = (weights / weights.sum()).float()
        if self.aggregation == "mean":
            params = {k: sum(w * d[k] for w, d in zip(weights, dilated)) for k in names}
        else:
            params = self._learned_mean(server_round, state, updates, dilated, weights, buffers, model)
        return {k: (params[k] if k in params else buffers[k]).detach().clone() for k in state}

    def _finetune_client(self, server_round: int, update: Update, num_classes: int) -> Update:
        """``update`` after ``client_finetune`` epochs of Adam on the public set at its own width
        (the code's ``pre_train_client``, for full-size clients too), kept at its best validation epoch."""
        model = self.ctx.template(update.ratio, num_classes)
        names = self._params(model)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in update.state.items() if k in names}
        buffers = {k: v for k, v in update.state.items() if k not in names}
        loss = lambda x, y: F.cross_entropy(_call(model, params | buffers, x), y)  # noqa: E731
        self.learn_on_public(f"finetune-client-{update.client}", [{"params": list(params.values()), "lr": self.finetune_lr}],
                             loss, lambda: params | buffers, model, epochs=self.client_finetune,
                             seed=[server_round, 4, update.client])
        state = {k: (params[k].detach() if k in params else v) for k, v in update.state.items()}
        return dataclasses.replace(update, state=state)

    def _dilate_client(self, server_round: int, state: dict[str, torch.Tensor], update: Update,
                       model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The client's sub-model at the global shape; its dilation kernels tuned first."""
        params = self._params(model)
        if update.ratio >= self.global_ratio:
            return {k: update.state[k] for k in params}
        sub_shapes = {k: tuple(v.shape) for k, v in update.state.items()}
        kernels = self._kernels(self.dilation, update.client, state, sub_shapes)
        # buffers of the dilated model: the client's where it holds them, the global's elsewhere
        frame = aggregate_windows(state, [(update.state, 1.0, 0)])

        def grown() -> dict[str, torch.Tensor]:
            return frame | {k: self._activate(dilate(update.state[k], self._effective(kernels[k]), tuple(state[k].shape)))
                            for k in kernels}

        loss = lambda x, y: F.cross_entropy(_call(model, grown(), x), y)  # noqa: E731
        self._fit(f"dilate-{update.client}", kernels.values(), loss, grown, model, [server_round, 2, update.client])
        with torch.no_grad():
            return {k: v.detach() for k, v in grown().items() if k in params}

    def _learned_mean(self, server_round: int, state: dict[str, torch.Tensor], updates: list[Update],
                      dilated: list[dict[str, torch.Tensor]], weights: torch.Tensor,
                      buffers: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Element-wise softmax-weighted mix of the dilated models and the previous global model."""
        logits, stacks = {}, {}
        for key in self._params(model):
            masks = torch.stack([coverage(state[key].shape, u.state[key].shape) for u in updates])  # (K, *G)
            held = masks.amax(dim=0, keepdim=True)
            clients = weights.log().view(-1, *[1] * state[key].dim()) + UNCOVERED * (1 - masks)
            logits[key] = torch.cat([clients, UNCOVERED * held]).requires_grad_(True)  # (K + 1, *G)
            stacks[key] = torch.stack([d[key] for d in dilated] + [state[key]])

        def mixed() -> dict[str, torch.Tensor]:
            return {k: (logits[k].softmax(dim=0) * stacks[k]).sum(dim=0) for k in logits}

        loss = lambda x, y: F.cross_entropy(_call(model, mixed() | buffers, x), y)  # noqa: E731
        self._fit("aggregate", logits.values(), loss, lambda: mixed() | buffers, model, [server_round, 3])
        with torch.no_grad():
            return mixed()

    # ------------------------------------------------------------------ learning on the public set
    def _fit(self, name: str, params: Iterable[torch.Tensor], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             produced: Callable[[], dict[str, torch.Tensor]], model: torch.nn.Module, seed: list[int]) -> None:
        """One phase: Adam over the public training part (``epochs``, or ``steps`` batches), kept
        at its best epoch on the validation part; (first, last) batch losses in :attr:`losses`."""
        params = list(params)
        # lr_scale 'window' (the earlier version): Adam moves every entry by ~lr a step, so a
        # kernel of k entries was given lr / k to move its total mass by ~lr; with 5 steps an
        # entry of a 57x29 kernel then moved by ~3e-6 a round: the kernels never left their start
        scale = (lambda p: p[0].numel() if p.dim() == 4 else 1) if self.lr_scale == "window" else (lambda p: 1)
        groups = [{"params": [p], "lr": self.lr / scale(p)} for p in params]
        phase = self.learn_on_public(name, groups, loss_fn, produced, model, epochs=self.epochs, steps=self.steps,
                                     seed=seed)
        self.losses[name] = (phase.train_first, phase.train_last)

    def _effective(self, kernel: torch.Tensor) -> torch.Tensor:
        return non_expansive(kernel) if self.bounded else kernel

    def _activate(self, t: torch.Tensor) -> torch.Tensor:
        return modified_leaky_relu(t) if self.activation == "mlr" else t

    def _params(self, model: torch.nn.Module) -> set[str]:
        return {name for name, _ in model.named_parameters()}

    def _kernels(self, store: dict[Any, Kernels], owner: Any, state: dict[str, torch.Tensor],
                 sub_shapes: dict[str, tuple[int, ...]]) -> Kernels:
        """``owner``'s kernels for every parameter that shrinks (created at ``init`` when new)."""
        model = self.ctx.template(self.global_ratio, num_classes_of(state))
        kernels = store.setdefault(owner, {})
        for i, key in enumerate(sorted(self._params(model))):
            g, s = tuple(state[key].shape), sub_shapes[key]
            if g != s and (key not in kernels or tuple(kernels[key].shape) != kernel_shape(g, s)):
                if self.init == "paper":  # seeded by owner and key: a resumed run draws the same
                    tag = int(owner * 1e4) if isinstance(owner, float) else 10 ** 6 + int(owner)
                    gen = torch.Generator().manual_seed(derive_seed(self.ctx.seed, tag, i, *g))
                    kernels[key] = paper_kernel(g, s, gen).requires_grad_(True)
                else:
                    kernels[key] = identity_kernel(g, s).requires_grad_(True)
        return kernels

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Learned kernels (per tier ratio and per client), for exact ``--resume``."""
        detach = lambda ks: {k: v.detach().clone() for k, v in ks.items()}  # noqa: E731
        return {"compression": {repr(r): detach(ks) for r, ks in self.compression.items()},
                "dilation": {int(c): detach(ks) for c, ks in self.dilation.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load = lambda ks: {k: v.clone().requires_grad_(True) for k, v in ks.items()}  # noqa: E731
        self.compression = {float(r): load(ks) for r, ks in state["compression"].items()}
        self.dilation = {int(c): load(ks) for c, ks in state["dilation"].items()}


_call = pl.forward
server_threads = pl.server_threads  # re-exported: where it lived before
