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
  ``torch.func.functional_call``. Work is bounded: ``steps`` batches per phase per round.

Where this differs from the public code (github.com/lemingshen/FedConv), and why:

- kernels start as a delta at the window's top-left corner, so before any learning compression
  is HeteroFL's static slice and dilation is zero-padding; the public code starts from random
  kernels followed by a "modified leaky ReLU" on every weight, and needs several epochs on the
  public set per round to recover. Here learning improves on the slicing baseline rather than
  first having to reach it, and r = 1 is an exact identity.
- every kernel is used L1-normalised (:func:`non_expansive`), so compression and dilation
  never grow a weight's magnitude; the public code bounds its kernels with weight
  normalisation (and adds a 1x1 "projection", a reparametrisation dropped here).
- BatchNorm running statistics are buffers, not learnt: sliced to the sub-model and folded back
  per element as in HeteroFL (the public code sends sliced buffers and restores them as 0/1).
- the element-wise aggregation logits start at log(example share) where a client's window holds
  an element and ``UNCOVERED`` below it elsewhere, with the previous global model as one more
  candidate that wins where no client holds an element: the first step is HeteroFL's average.
  They are learnt afresh every round (the sampled clients change; the public code keeps one
  weight per client and layer).
- each kernel's Adam step size is ``lr`` / its window size (see :meth:`FedConv._fit`).
- the server does not fine-tune the global model itself on the public set (the public code
  does): that would give FedConv data the baselines do not see.
- in continual learning the public set of experience t is the held-out data of experiences
  0..t (the server keeps what it held), so the kernels do not learn to forget old classes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.func import functional_call

from clsim.errors import ConfigError
from clsim.federated.submodels import aggregate_windows, coverage, slice_state
from clsim.federated.substrategies import SubModelStrategy, Update, num_classes_of, public_batch
from clsim.registry import SERVER_STRATEGIES

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


# ---------------------------------------------------------------------- the strategy
@SERVER_STRATEGIES.register("fedconv")
class FedConv(SubModelStrategy):
    """FedConv (Shen et al., MobiSys 2024): learned convolutional compression, dilation, aggregation.

    Sub-models are the global weights convolved with learned kernels; the server dilates them
    back by transposed convolution and mixes them with learned element-wise weights, all
    learnt on the server's public set (see the module docstring).

    Args:
        steps: public-set batches per learning phase per round (compression per tier, dilation
            per client, aggregation): bounds the server's work.
        batch_size: public-set examples per batch.
        lr: Adam learning rate of kernels and aggregation logits.
        aggregation: 'learned' (element-wise softmax weights) or 'mean' (example-weighted mean
            of the dilated models).
        weighting: how clients' examples weigh ('examples' or 'uniform'), for both aggregations.
        bounded: use every kernel L1-normalised (:func:`non_expansive`); False uses the raw
            kernels, which drift to large gains over rounds (kept to reproduce that finding).
    """

    uses_public_data = True

    def __init__(self, *, steps: int = 5, batch_size: int = 64, lr: float = 1e-3,
                 aggregation: Literal["learned", "mean"] = "learned",
                 weighting: Literal["examples", "uniform"] = "examples", bounded: bool = True):
        super().__init__(weighting=weighting)
        for key, value in (("steps", steps), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < (0 if key == "steps" else 1):
                raise ConfigError(f"federated.server.{key}", f"expected an int >= {0 if key == 'steps' else 1}, got {value!r}")
        if not (lr > 0 and math.isfinite(lr)):  # an infinite rate turns every kernel into NaN
            raise ConfigError("federated.server.lr", f"expected a finite number > 0, got {lr!r}")
        if aggregation not in ("learned", "mean"):
            raise ConfigError("federated.server.aggregation", f"expected 'learned' or 'mean', got {aggregation!r}")
        self.steps, self.batch_size, self.lr, self.aggregation = steps, batch_size, lr, aggregation
        self.bounded = bool(bounded)
        self.compression: dict[float, Kernels] = {}  # per tier ratio
        self.dilation: dict[int, Kernels] = {}  # per client
        self.losses: dict[str, tuple[float, float]] = {}  # per phase: (first, last) public-batch loss

    # ------------------------------------------------------------------ compression
    def submodel(self, server_round: int, state: dict[str, torch.Tensor], ratio: float, *,
                 learn: bool = True) -> dict[str, torch.Tensor]:
        """Compress ``state`` for tier ``ratio``, first tuning that tier's kernels on the public set."""
        with server_threads():
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
            loss = lambda x, y: F.cross_entropy(_call(model, self._compress(state, kernels, shapes), x), y)  # noqa: E731
            self.losses[f"compress-{ratio:g}"] = self._fit(kernels.values(), loss, [server_round, 1, int(ratio * 1e4)])
        with torch.no_grad():
            return {k: v.detach().clone() for k, v in self._compress(state, kernels, shapes).items()}

    def _compress(self, state: dict[str, torch.Tensor], kernels: Kernels, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        out = slice_state(state, shapes)  # buffers and unshrunk tensors: the static window
        for key, kernel in kernels.items():
            out[key] = compress(state[key], self._effective(kernel), shapes[key])
        return out

    # ------------------------------------------------------------------ dilation and aggregation
    def combine(self, server_round: int, state: dict[str, torch.Tensor], updates: list[Update]) -> dict[str, torch.Tensor]:
        """Dilate every update (tuning each client's kernels), then aggregate them."""
        with server_threads():
            return self._combine(server_round, state, updates)

    def _combine(self, server_round: int, state: dict[str, torch.Tensor], updates: list[Update]) -> dict[str, torch.Tensor]:
        n = num_classes_of(state)
        model = self.ctx.template(self.global_ratio, n)
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
            return frame | {k: dilate(update.state[k], self._effective(kernels[k]), tuple(state[k].shape)) for k in kernels}

        loss = lambda x, y: F.cross_entropy(_call(model, grown(), x), y)  # noqa: E731
        self.losses[f"dilate-{update.client}"] = self._fit(kernels.values(), loss, [server_round, 2, update.client])
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
        self.losses["aggregate"] = self._fit(logits.values(), loss, [server_round, 3])
        with torch.no_grad():
            return mixed()

    # ------------------------------------------------------------------ learning on the public set
    def _fit(self, params: Iterable[torch.Tensor], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             seed: list[int]) -> tuple[float, float]:
        """``steps`` Adam steps on public batches; the (first, last) batch losses (nan: nothing learnt)."""
        params = list(params)
        if not params or self.steps == 0:
            return float("nan"), float("nan")
        x, y = self.ctx.public(self._experience)
        # Adam moves every entry by ~lr a step, so a kernel of k*k entries would move its total
        # mass by k*k*lr (a 57x29 kernel: 1,653x): each kernel's rate is lr / its window size, so
        # any kernel's mass, like an aggregation weight, moves by about lr per step
        groups = [{"params": [p], "lr": self.lr / (p[0].numel() if p.dim() == 4 else 1)} for p in params]
        optimizer = torch.optim.Adam(groups, lr=self.lr)
        losses = []
        for step in range(self.steps):
            xb, yb = public_batch(x, y, self.batch_size, [self.ctx.seed, *seed, step])
            optimizer.zero_grad()
            loss = loss_fn(xb, yb)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return losses[0], losses[-1]

    def _effective(self, kernel: torch.Tensor) -> torch.Tensor:
        return non_expansive(kernel) if self.bounded else kernel

    def _params(self, model: torch.nn.Module) -> set[str]:
        return {name for name, _ in model.named_parameters()}

    def _kernels(self, store: dict[Any, Kernels], owner: Any, state: dict[str, torch.Tensor],
                 sub_shapes: dict[str, tuple[int, ...]]) -> Kernels:
        """``owner``'s kernels for every parameter that shrinks (created as deltas when new)."""
        model = self.ctx.template(self.global_ratio, num_classes_of(state))
        kernels = store.setdefault(owner, {})
        for key in self._params(model):
            g, s = tuple(state[key].shape), sub_shapes[key]
            if g != s and (key not in kernels or tuple(kernels[key].shape) != kernel_shape(g, s)):
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


@contextlib.contextmanager
def server_threads(threads: int = 1) -> Iterator[None]:
    """Server learning on one torch thread: its many small convolutions run slower with more
    (measured: 30 ms vs 0.25 ms per grouped conv step on 2 shared cores), and the float sums,
    so the learnt kernels, do not then depend on the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _call(model: torch.nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with ``state`` as its weights (differentiable in them); training-mode
    BatchNorm normalises by batch statistics and updates copies of the running ones."""
    model.train()
    bound = {k: v if v.requires_grad or v.grad_fn is not None else v.clone() for k, v in state.items()}
    return functional_call(model, bound, (x,))
