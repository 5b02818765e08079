"""Width-scaled sub-models for heterogeneous clients, and the slicing that HeteroFL and FedRolex use.

A client of fleet tier ratio r trains the same architecture with every hidden width scaled
by r (rounded up, HeteroFL's convention): the input side of the first layer and the class
side of the head keep their size, so only hidden dimensions shrink. Its state dict has the
global model's keys with smaller shapes. Which models can be scaled is a table here
(:data:`SCALERS`: model name -> how its YAML kwargs change with r); any other model is
refused before the run starts.

Slicing (HeteroFL, Diao et al. ICLR 2021; FedRolex, Alam et al. NeurIPS 2022): along each
dimension where the sub-model is smaller, it takes ``S`` of the ``G`` global indices, a window
``(offset + arange(S)) % G``. HeteroFL's window starts at 0; FedRolex moves it by one every
round. The window depends only on ``(G, S, offset)``, so a hidden layer's output channels and
the next layer's input channels always pick the same indices. Aggregation averages each
global element over the clients whose window holds it and keeps the old value where none does.

HeteroFL's code adds, and FedRolex's keeps, three pieces that this module applies to a built
model (:func:`build_submodel`'s options; no model code changes, the state dict keeps its keys):

- the width ``Scaler``: every scaled layer's output divided by the client's rate in training
  (identity in eval), a forward hook on each backbone conv / linear (:class:`Scaler`);
- static BN (sBN): BatchNorm uses batch statistics and tracks none in local training
  (``track_running_stats=False``); the global model's statistics are computed afterwards by
  :func:`bn_statistics` on the clients' data;
- masked logits: in training, the logits of classes a client holds no data for are 0
  (``masked_fill(label_mask == 0, 0)``), a forward hook on the head (:func:`mask_absent`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from clsim.errors import ConfigError
from clsim.models.cifar_resnet import scaled_width  # one rounding rule for every model

Shapes = dict[str, tuple[int, ...]]
Window = tuple[torch.Tensor, ...]  # one index vector per dimension of a tensor


def _mlp(kwargs: dict[str, Any], r: float) -> dict[str, Any]:
    return kwargs | {"hidden": [scaled_width(h, r) for h in kwargs.get("hidden", [256, 256])]}


def _cnn(kwargs: dict[str, Any], r: float) -> dict[str, Any]:
    return kwargs | {"channels": [scaled_width(c, r) for c in kwargs.get("channels", [32, 64])],
                     "hidden": scaled_width(kwargs.get("hidden", 128), r)}


def _resnet_cifar(kwargs: dict[str, Any], r: float) -> dict[str, Any]:
    return kwargs | {"width_ratio": r * kwargs.get("width_ratio", 1.0)}


SCALERS: dict[str, Callable[[dict[str, Any], float], dict[str, Any]]] = {
    "mlp": _mlp, "cnn": _cnn, "resnet_cifar": _resnet_cifar,
}
"""Model name -> its YAML kwargs for width ratio r (ViTs are not here: refused, see :func:`check_model`)."""


def check_model(model_section: Any, server_name: str) -> None:
    """Refuse a model that sub-model server strategies cannot scale (one line, names the model)."""
    if model_section.name not in SCALERS:
        raise ConfigError("model.name", f"server strategy '{server_name}' sends width-scaled sub-models; "
                                        f"it supports models {sorted(SCALERS)}, not '{model_section.name}'")


def build_submodel(model_section: Any, input_shape: tuple[int, ...], ratio: float, *,
                   scaler_rate: float = 1.0, static_bn: bool = False) -> nn.Module:
    """The model of ``model_section`` with hidden widths scaled by ``ratio`` (1: the model itself).

    Args:
        scaler_rate: HeteroFL's ``Scaler`` rate (client rate / global rate): in training, every
            backbone conv / linear output is divided by it (1: no scaler).
        static_bn: BatchNorm layers use batch statistics and track none while training (sBN).
    """
    if ratio >= 1.0:
        model = model_section.build(input_shape)
    elif model_section.name not in SCALERS:
        raise ConfigError("model.name", f"cannot build a width-scaled sub-model of '{model_section.name}'")
    else:
        model = model_section.factory(input_shape, **SCALERS[model_section.name](dict(model_section.kwargs), ratio))
    if scaler_rate != 1.0:
        add_scalers(model, scaler_rate)
    if static_bn:
        static_batch_norm(model)
    return model


# ---------------------------------------------------------------------- HeteroFL's model pieces
class Scaler:
    """HeteroFL's ``Scaler(rate)`` as a forward hook: ``output / rate`` in training, identity in eval.

    A sub-model layer sums over a fraction ``rate`` of the global layer's inputs; dividing its
    output by ``rate`` in training keeps the activations at the global model's scale (Diao et
    al. 2021, Sec. 3.2). A hook, not a module, so the state dict keeps the global model's keys.
    """

    def __init__(self, rate: float):
        if not 0 < rate <= 1:
            raise ValueError(f"scaler rate must be in (0, 1], got {rate}")
        self.rate = float(rate)

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return output / self.rate if module.training else output


def scaled_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose output width scales with the rate: every conv / linear of the backbone
    (the head keeps its classes and, as in HeteroFL's code, gets no scaler)."""
    return [m for m in model.backbone.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def add_scalers(model: nn.Module, rate: float) -> None:
    """A :class:`Scaler` after every scaled layer (HeteroFL puts one after each conv, before its norm)."""
    for layer in scaled_layers(model):
        layer.register_forward_hook(Scaler(rate))


def batch_norms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The model's BatchNorm layers with their names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def static_batch_norm(model: nn.Module) -> None:
    """sBN in local training: batch statistics, no running statistics updated.

    HeteroFL builds local models with ``track_running_stats=False``. Here the flag is switched
    off on the built layers instead, which keeps the running buffers (the state dict keeps its
    keys and eval still uses them) while training neither reads nor updates them (torch's
    ``_BatchNorm.forward``: running stats are passed only if ``track_running_stats``).
    """
    for _, bn in batch_norms(model):
        bn.track_running_stats = False


class LabelMask:
    """A forward hook on the head: logits of classes outside ``classes`` are 0 in training.

    HeteroFL's and FedRolex's ``out.masked_fill(label_mask == 0, 0)``: the cross-entropy still
    counts the masked classes (each contributes ``exp(0)`` to the softmax denominator), but their
    logits are constants, so their head rows get no gradient from the loss.
    """

    def __init__(self, classes: Sequence[int]):
        self.classes = sorted(int(c) for c in classes)

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        mask = torch.zeros(output.shape[-1], dtype=torch.bool, device=output.device)
        mask[[c for c in self.classes if c < output.shape[-1]]] = True
        return output.masked_fill(~mask, 0)


def held_labels(datasets: Sequence[Any]) -> list[int]:
    """The classes that occur in ``datasets`` (each exposing ``targets``): a client's ``label_split``."""
    found: set[int] = set()
    for data in datasets:
        if len(data):
            found.update(int(c) for c in torch.unique(torch.as_tensor(data.targets)).tolist())
    return sorted(found)


def mask_absent(model: nn.Module, classes: Sequence[int]) -> RemovableHandle:
    """Mask the training logits of every class not in ``classes`` (call after the head has grown:
    growing replaces the head module and drops the hook); the handle removes the mask."""
    return model.head.register_forward_hook(LabelMask(classes))


@torch.no_grad()
def bn_statistics(model: nn.Module, batches: Any) -> tuple[dict[str, torch.Tensor], int]:
    """HeteroFL's ``stats``: the model's BN statistics over ``batches`` (train-mode passes).

    HeteroFL rebuilds the global model with ``momentum=None, track_running_stats=True`` and runs
    it in train mode over the training data: each running statistic becomes the mean, over
    batches, of the batch mean and of the unbiased batch variance. Returns those per-layer
    sums over batches (``<bn>.running_mean`` and ``<bn>.running_var``, summed, not averaged, so
    that several clients' sums add up) and the number of batches. The model is left as it was.
    """
    layers = batch_norms(model)
    saved = [(bn.momentum, bn.track_running_stats, bn.running_mean.clone(), bn.running_var.clone(),
              bn.num_batches_tracked.clone()) for _, bn in layers]
    was_training = model.training
    for _, bn in layers:
        bn.momentum, bn.track_running_stats = None, True  # cumulative average over batches
        bn.reset_running_stats()
    model.train()
    count = 0
    for x, _ in batches:
        model(x)
        count += 1
    sums = {}
    for name, bn in layers:
        sums[f"{name}.running_mean"] = (bn.running_mean * count).cpu()
        sums[f"{name}.running_var"] = (bn.running_var * count).cpu()
    for (_, bn), (momentum, track, mean, var, tracked) in zip(layers, saved):
        bn.momentum, bn.track_running_stats = momentum, track
        bn.running_mean.copy_(mean), bn.running_var.copy_(var), bn.num_batches_tracked.copy_(tracked)
    model.train(was_training)
    return sums, count


def fold_bn_statistics(state: dict[str, torch.Tensor], parts: list[tuple[dict[str, torch.Tensor], int]]
                       ) -> dict[str, torch.Tensor]:
    """The global ``state`` with its BN running statistics replaced by the batch-mean over every
    client's batches (``parts``: :func:`bn_statistics` of each client); unchanged without batches."""
    total = sum(n for _, n in parts)
    if not total:
        return state
    out = dict(state)
    for key in parts[0][0]:
        out[key] = (sum(s[key].double() for s, _ in parts) / total).to(state[key].dtype)
        tracked = key.rsplit(".", 1)[0] + ".num_batches_tracked"
        if tracked in out:
            out[tracked] = torch.tensor(total, dtype=state[tracked].dtype)
    return out


# ---------------------------------------------------------------------- slicing windows
def window(global_shape: Sequence[int], sub_shape: Sequence[int], offset: int = 0) -> Window:
    """Per dimension, the global indices a sub-model tensor occupies: ``(offset + arange(S)) % G``.

    Dimensions of equal size are taken whole (offset ignored): only hidden widths roll.
    """
    if len(global_shape) != len(sub_shape):
        raise ValueError(f"rank mismatch: global {tuple(global_shape)}, sub-model {tuple(sub_shape)}")
    out = []
    for g, s in zip(global_shape, sub_shape):
        if s > g:
            raise ValueError(f"sub-model shape {tuple(sub_shape)} exceeds global {tuple(global_shape)}")
        out.append(torch.arange(g) if s == g else (offset + torch.arange(s)) % g)
    return tuple(out)


def extract(tensor: torch.Tensor, win: Window) -> torch.Tensor:
    """The sub-tensor at ``win`` (a copy)."""
    if tensor.dim() == 0:
        return tensor.clone()
    return tensor[torch.meshgrid(*win, indexing="ij")].clone()


def slice_state(state: dict[str, torch.Tensor], shapes: Shapes, offset: int = 0) -> dict[str, torch.Tensor]:
    """The sub-model state dict cut out of the global ``state`` (HeteroFL / FedRolex windows)."""
    return {k: extract(v, window(v.shape, shapes[k], offset)) for k, v in state.items()}


HEAD_KEYS = ("head.weight", "head.bias")
"""The classifier's per-class rows (dimension 0 is the class)."""


def aggregate_windows(
    state: dict[str, torch.Tensor], updates: list[tuple[dict[str, torch.Tensor], float, int]],
    labels: Sequence[Sequence[int] | None] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-element weighted mean over the clients whose window holds each element.

    Args:
        state: the current global state dict (kept where no client holds an element).
        updates: ``(sub-model state, weight, window offset)`` per client.
        labels: per client, the classes it holds (None: all). A client then contributes only its
            classes' head rows, so the row of class c is averaged over the clients that hold c
            (HeteroFL's ``combine`` with ``label_split``; a class no client holds keeps its row).
    """
    labels = list(labels) if labels is not None else [None] * len(updates)
    out = {}
    for key, old in state.items():
        if not old.is_floating_point():  # BatchNorm's num_batches_tracked: a counter, not a weight
            out[key] = torch.stack([u[key].reshape(()) for u, _, _ in updates]).max() if updates else old
            continue
        total, weight = torch.zeros_like(old, dtype=torch.float64), torch.zeros_like(old, dtype=torch.float64)
        for (sub, w, offset), held_labels in zip(updates, labels):
            value, win = sub[key].double(), window(old.shape, sub[key].shape, offset) if old.dim() else ()
            if key in HEAD_KEYS and held_labels is not None:  # only the rows of the client's classes
                rows = torch.as_tensor(sorted(int(c) for c in held_labels if c < old.shape[0]), dtype=torch.long)
                value, win = value[rows], (win[0][rows], *win[1:])
            index = torch.meshgrid(*win, indexing="ij") if old.dim() else ()
            total.index_put_(index, w * value, accumulate=True)
            weight.index_put_(index, torch.full(value.shape, float(w), dtype=torch.float64), accumulate=True)
        held = weight > 0
        out[key] = torch.where(held, total / weight.clamp_min(1e-300), old.double()).to(old.dtype)
    return out


def coverage(global_shape: Sequence[int], sub_shape: Sequence[int], offset: int = 0) -> torch.Tensor:
    """A 0/1 mask of the global elements a sub-model window holds."""
    mask = torch.zeros(tuple(global_shape))
    if mask.dim() == 0:
        return torch.ones(())
    mask[torch.meshgrid(*window(global_shape, sub_shape, offset), indexing="ij")] = 1.0
    return mask
