"""Choosing which parameters a regulariser acts on (``params:`` in a strategy section)."""

from __future__ import annotations

import fnmatch
from typing import Literal

from torch import nn

from clsim.errors import ConfigError

ParamSpec = Literal["all", "backbone", "attention"] | list[str]

# "A Closer Look at Rehearsal-Free Continual Learning" (Smith et al.) regularises only the
# self-attention blocks of a pretrained ViT; in timm's ViTs those are `blocks.N.attn.*`.
PRESETS = {"all": ["*"], "backbone": ["backbone.*"], "attention": ["*.attn.*"]}


def select_parameters(model: nn.Module, spec: ParamSpec, *, key: str = "strategy.params") -> list[str]:
    """Names of the trainable parameters of ``model`` that ``spec`` selects.

    ``spec`` is a preset ('all', 'backbone', 'attention') or a list of glob patterns over
    parameter names (e.g. ``['backbone.blocks.*.attn.*']``). Selecting nothing is an error.
    """
    patterns = PRESETS[spec] if isinstance(spec, str) else list(spec)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    if not chosen:
        raise ConfigError(key, f"{spec!r} selects no parameter of this model; "
                               f"its parameters look like {', '.join(names[:4])}, ...")
    return chosen


def overlap(current, anchor):
    """The part of ``current`` with ``anchor``'s shape (a grown head keeps its old rows first)."""
    if current.shape == anchor.shape:
        return current
    return current[tuple(slice(0, s) for s in anchor.shape)]
