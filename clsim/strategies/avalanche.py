"""Avalanche training plugins (avalanche-lib) run as clsim strategies.

``strategy: {name: avalanche, plugin: SynapticIntelligencePlugin, si_lambda: 1.0}`` builds
``SynapticIntelligencePlugin(si_lambda=1.0)`` and drives its callbacks from clsim's engine. An
Avalanche plugin talks to its strategy by reading and writing attributes (``strategy.model``,
``strategy.loss += penalty``, ``strategy.experience.dataset``, ``strategy.clock``); clsim's
engine owns its loop and hands hooks values instead. :class:`PluginHost` is the small
strategy-like object in between: it holds what plugins read, and the hooks below call the
plugin's callbacks at the matching points of clsim's loop::

    clsim hook        Avalanche callbacks (in this order)
    before_task       before_training, before_train_dataset_adaptation,
                      after_train_dataset_adaptation, before_training_exp
    before_epoch      (after_training_epoch of the previous epoch), before_training_epoch
    prepare_batch     before_training_iteration            (once per step)
    loss              before_forward, (the forward pass), after_forward,
                      before_backward: cross-entropy + whatever the plugin adds to ``loss``
    after_backward    after_backward, before_update        (e.g. GEM's gradient projection)
    after_step        after_update, after_training_iteration
    after_task        after_training_epoch, after_training_exp, after_training
                      (a federated client's consolidation calls only this one, on a strategy
                      restored from its saved state: ``strategy.experience`` is set from the task)

Avalanche's own ``Clock`` runs last at every point, as in Avalanche, so ``clock.train_exp_counter``
counts the experiences trained. Evaluation callbacks are not called: clsim evaluates itself.

Replay plugins (``ReplayPlugin`` and others with a ``storage_policy``) replace Avalanche's data
loader by one that appends a memory batch to every data batch. clsim draws the data batches
itself, so :meth:`AvalancheStrategy.prepare_batch` appends the memory batch instead: each step
trains on ``train.batch_size`` new items plus ``batch_size_mem`` (default: the same) items from
the plugin's buffer, cycled in a seeded random order, as Avalanche's ``ReplayDataLoader`` does.

Checkpoints (``--resume``, federated clients) store the plugin object itself (its importances,
anchors, memories) and the clock, so a resumed run continues exactly; replay buffers are first
copied into tensors, so a checkpoint holds the buffer's items, not the whole data set they
came from. Checkpoints are read weights-only (:mod:`clsim.engine.checkpoint`), so the plugin
travels in them as pickled bytes, read back by an unpickler that admits only Avalanche's,
torch's and NumPy's classes and plain containers (:func:`load_plugin_state`).
"""

from __future__ import annotations

import difflib
import inspect
import io
import pickle
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from clsim.errors import ConfigError, did_you_mean
from clsim.registry import STRATEGIES
from clsim.scenarios.base import Experience
from clsim.strategies.base import Batches, Strategy, Task

DEFAULT_PLUGIN = "MASPlugin"

# Plugins the adapter drives and the test suite runs end to end.
SUPPORTED = ("SynapticIntelligencePlugin", "MASPlugin", "EWCPlugin", "ReplayPlugin", "GEMPlugin",
             "LwFPlugin")

# Plugins holding per-parameter state (importances, anchors) indexed like the model's own
# weights: width-sliced sub-models (FedRolex) would misalign it. Replay and LwF keep data or a
# whole model; GEM recomputes its gradients on the model it is handed.
PARAMETER_STATE = ("SynapticIntelligencePlugin", "MASPlugin", "EWCPlugin")

# Avalanche plugins that cannot run inside clsim's loop, and why (one line each).
REFUSED = {
    "EvaluationPlugin": "clsim evaluates and writes metrics.json itself",
    "EarlyStoppingPlugin": "it stops on Avalanche's periodic validation, which clsim's loop does not run",
    "LRSchedulerPlugin": "clsim sets the learning-rate schedule itself (train.schedule)",
    "GDumbPlugin": "it re-initialises the model for every experience through Avalanche's model adaptation",
    "FromScratchTrainingPlugin": "it re-initialises the model through Avalanche's model adaptation",
    "BiCPlugin": "it trains a bias-correction layer in an extra phase with its own data loaders",
    "CWRStarPlugin": "it needs a model with a named CWR head and task-aware model adaptation",
    "CoPEPlugin": "it replaces the classifier by prototypes and its own loss (PPPloss)",
    "GenerativeReplayPlugin": "it needs a generator model and Avalanche's generative strategies",
    "TrainGeneratorAfterExpPlugin": "it needs a generator model and Avalanche's generative strategies",
    "GSS_greedyPlugin": "it builds its buffer inside Avalanche's data-loader loop",
    "MIRPlugin": "it changes the optimizer step (virtual updates) that clsim's engine owns",
    "RARPlugin": "it builds adversarial replay batches inside Avalanche's data-loader loop",
    "AGEMPlugin": "it samples its reference batch from Avalanche's replay data loader",
    "RWalkPlugin": "it reads the optimizer's learning rate and steps that clsim's engine owns",
    "LFLPlugin": "it needs Avalanche's feature-extractor / classifier split of the model",
    "FeatureDistillationPlugin": "it needs Avalanche's feature-extractor / classifier split of the model",
}


def _plugins_module() -> Any:
    """``avalanche.training.plugins``, imported only when an Avalanche strategy is built (~10 s)."""
    # Avalanche's ParamData.expand indexes with a list, which PyTorch warns about at every step
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
    # ReplayPlugin calls its storage policy's deprecated update() itself
    warnings.filterwarnings("ignore", message="Call to deprecated function update")
    try:
        from avalanche.training import plugins
    except ImportError:
        raise ConfigError("strategy.name", "strategy 'avalanche' needs avalanche-lib: "
                                           "pip install 'clsim[avalanche]'") from None
    return plugins


def plugin_class(name: str) -> type:
    """The supported Avalanche plugin class called ``name``; a one-line ConfigError otherwise."""
    module = _plugins_module()
    known = sorted(n for n in dir(module) if n.endswith("Plugin") and n != "SupervisedPlugin")
    if name in REFUSED:
        raise ConfigError("strategy.plugin", f"Avalanche's {name} cannot run as a clsim strategy: "
                                             f"{REFUSED[name]}; supported: {', '.join(SUPPORTED)}")
    if name not in SUPPORTED:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" (close: {', '.join(close)})" if close else ""
        what = "is not supported by clsim's adapter" if name in known else "is not an Avalanche training plugin"
        raise ConfigError("strategy.plugin", f"'{name}' {what}{hint}; supported: {', '.join(SUPPORTED)}")
    return getattr(module, name)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


Rule = tuple[Callable[[Any], bool], str]
NONNEGATIVE: Rule = (lambda v: _is_number(v) and v >= 0, "a number >= 0")
POSITIVE: Rule = (lambda v: _is_number(v) and v > 0, "a number > 0")
UNIT: Rule = (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
AT_LEAST_1: Rule = (lambda v: _is_int(v) and v >= 1, "an int >= 1")
AT_LEAST_1_OR_NULL: Rule = (lambda v: v is None or (_is_int(v) and v >= 1), "null or an int >= 1")
BOOL: Rule = (lambda v: isinstance(v, bool), "true or false")
STR: Rule = (lambda v: isinstance(v, str), "a string")
# a lambda per experience is allowed (SI's si_lambda, LwF's alpha)
NONNEGATIVE_OR_LIST: Rule = (
    lambda v: NONNEGATIVE[0](v) or (isinstance(v, list) and bool(v) and all(map(NONNEGATIVE[0], v))),
    "a number >= 0 or a list of them (one per experience)")

# The argument checks of the supported plugins: Avalanche checks few of them itself, and a
# wrong one fails deep inside training (``ewc_lambda: abc`` after experience 0 has trained).
ARGUMENTS: dict[str, dict[str, Rule]] = {
    "SynapticIntelligencePlugin": {
        "si_lambda": NONNEGATIVE_OR_LIST, "eps": POSITIVE, "device": STR,
        "excluded_parameters": (lambda v: v is None or (isinstance(v, list) and all(isinstance(p, str) for p in v)),
                                "null or a list of parameter-name prefixes")},
    "MASPlugin": {"lambda_reg": NONNEGATIVE, "alpha": UNIT, "verbose": BOOL},
    "EWCPlugin": {"ewc_lambda": NONNEGATIVE, "mode": (lambda v: v in ("separate", "online"), "'separate' or 'online'"),
                  "decay_factor": (lambda v: v is None or UNIT[0](v), "null or a number in [0, 1]"),
                  "keep_importance_data": BOOL},
    "ReplayPlugin": {"mem_size": AT_LEAST_1, "batch_size": AT_LEAST_1_OR_NULL, "batch_size_mem": AT_LEAST_1_OR_NULL,
                     "task_balanced_dataloader": BOOL,
                     "storage_policy": (lambda v: v is None,
                                        "null (a storage-policy object cannot be given in a config)")},
    "GEMPlugin": {"patterns_per_experience": AT_LEAST_1, "memory_strength": NONNEGATIVE},
    "LwFPlugin": {"alpha": NONNEGATIVE_OR_LIST, "temperature": POSITIVE},
}


def _rule_from_default(default: Any) -> Rule | None:
    """For an argument a newer Avalanche adds: the type of its default, when it has a plain one."""
    if isinstance(default, bool):
        return BOOL
    if isinstance(default, int):
        return (_is_int, "an int")
    if isinstance(default, float):
        return (_is_number, "a number")
    if isinstance(default, str):
        return STR
    return None


def check_plugin_args(name: str, kwargs: dict[str, Any], params: dict[str, inspect.Parameter]) -> None:
    """Each argument's type and range, as a ConfigError naming ``strategy.<argument>``."""
    rules = ARGUMENTS.get(name, {})
    for key, value in kwargs.items():
        rule = rules.get(key) or _rule_from_default(params[key].default)
        if rule is not None and not rule[0](value):
            raise ConfigError(f"strategy.{key}", f"{name} expects {rule[1]}, got {value!r}")


def build_plugin(name: str, kwargs: dict[str, Any]) -> Any:
    """``name(**kwargs)``, with unknown, missing or ill-typed arguments as ConfigErrors."""
    cls = plugin_class(name)
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
              if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key in kwargs:
        if key not in params:
            raise ConfigError(f"strategy.{key}", f"{name} has no argument '{key}'{did_you_mean(key, params)}; "
                                                 f"known: {', '.join(params) or 'none'}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ConfigError(f"strategy.{missing[0]}", f"required by {name}")
    check_plugin_args(name, kwargs, params)
    try:
        return cls(**kwargs)
    except Exception as exc:  # the plugin's own checks (e.g. EWC's online mode needs decay_factor)
        text = str(exc).strip().splitlines()
        raise ConfigError("strategy.plugin", f"{name}: {text[0] if text else type(exc).__name__}") from None


# ------------------------------------------------------------------------ what plugins read


class _ZeroGrad:
    """Stands in for ``strategy.optimizer``: plugins only clear gradients before their own
    backward passes (EWC's Fisher, MAS's importances, GEM's reference gradients); the real
    optimizer is the engine's."""

    def __init__(self, model: nn.Module):
        self.model = model

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)


# What a pickled plugin may reference: Avalanche's own classes, torch and NumPy types and
# plain containers. Anything else (os.system, subprocess, ...) in a tampered checkpoint is refused.
_PLUGIN_MODULES = ("avalanche.", "torch", "numpy", "collections", "copyreg", "_codecs", "builtins", "functools")
_UNSAFE_BUILTINS = {"eval", "exec", "compile", "open", "__import__", "setattr", "delattr",
                    "globals", "locals", "vars", "input", "breakpoint"}


class _PluginUnpickler(pickle.Unpickler):
    """Unpickles a checkpointed Avalanche plugin, allowing only the modules it is made of.

    A guard against a checkpoint that names other code (``os.system``), not a sandbox: what
    Avalanche, torch and NumPy can do when called is allowed. Resume Avalanche runs only from
    run folders you made."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = module == "builtins" and name not in _UNSAFE_BUILTINS or \
            module != "builtins" and any(module == m.rstrip(".") or module.startswith(m) for m in _PLUGIN_MODULES)
        if not allowed:
            raise ConfigError("--resume", f"the checkpoint's Avalanche plugin state refers to {module}.{name}, "
                                          f"which no Avalanche plugin needs: refused (is the file from elsewhere?)")
        return super().find_class(module, name)


def load_plugin_state(data: bytes) -> Any:
    """The plugin object :meth:`AvalancheStrategy.state_dict` saved, through :class:`_PluginUnpickler`."""
    return _PluginUnpickler(io.BytesIO(data)).load()


class PluginExperience:
    """A clsim :class:`Experience` as Avalanche plugins read ``strategy.experience``.

    ``dataset`` is an Avalanche classification dataset over the experience's training data
    (items ``(x, y, task_label=0)``, no copy), built when a plugin first asks for it.
    """

    def __init__(self, experience: Experience):
        self.clsim = experience
        self.current_experience = experience.index
        self.classes_in_this_experience = list(experience.classes)
        self.task_label = 0
        self.task_labels = [0]
        self._dataset = None

    @property
    def dataset(self) -> Any:
        if self._dataset is None:
            from avalanche.benchmarks.utils.classification_dataset import (
                _make_taskaware_classification_dataset,
            )

            data = self.clsim.train
            self._dataset = _make_taskaware_classification_dataset(
                data, task_labels=0, targets=[int(t) for t in data.targets])
        return self._dataset


class PluginHost:
    """The strategy-like object an Avalanche plugin is handed: the attributes plugins read.

    The adapter sets them before each callback; plugins add to ``loss`` and may replace
    ``dataloader`` (replay), which the adapter then reads back.
    """

    def __init__(self, clock: Any):
        self.clock = clock
        self.model: nn.Module | None = None
        self.optimizer: _ZeroGrad | None = None
        self._criterion = nn.CrossEntropyLoss()
        self.experience: PluginExperience | None = None
        self.adapted_dataset: Any = None
        self.dataloader: Any = None
        self.mbatch: list[torch.Tensor] | None = None
        self.mb_output: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        self.train_mb_size = 1
        self.eval_mb_size = 1
        self.train_epochs = 1
        self.device = torch.device("cpu")
        self.is_training = True
        self.retain_graph = False

    @property
    def mb_x(self) -> torch.Tensor:
        return self.mbatch[0]

    @property
    def mb_y(self) -> torch.Tensor:
        return self.mbatch[1]

    @property
    def mb_task_id(self) -> torch.Tensor:
        return self.mbatch[-1]

    def criterion(self) -> torch.Tensor:
        return self._criterion(self.mb_output, self.mb_y)


# Callbacks after which a plugin may hold fresh snapshots of the weights (see ``_unalias``).
SNAPSHOT_EVENTS = ("before_training_exp", "before_training_iteration", "after_training_iteration",
                   "after_training_exp")


def _param_data(tree: Any, depth: int = 0) -> list[Any]:
    """Avalanche ``ParamData`` objects (importances, snapshots) held in a plugin's attributes."""
    if type(tree).__name__ == "ParamData":
        return [tree]
    if depth > 3:
        return []
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        return [found for item in tree for found in _param_data(item, depth + 1)]
    return []


# ----------------------------------------------------------------------------- the strategy


@STRATEGIES.register("avalanche")
class AvalancheStrategy(Strategy):
    """An Avalanche training plugin (avalanche-lib) as a clsim strategy, e.g. SynapticIntelligencePlugin.

    Supported: SynapticIntelligencePlugin, MASPlugin, EWCPlugin, ReplayPlugin, GEMPlugin,
    LwFPlugin; other plugins are refused with the reason. Every other key of the section is
    the plugin's own constructor argument (``si_lambda``, ``ewc_lambda``, ``mem_size``, ...).

    Args:
        plugin: the plugin class in ``avalanche.training.plugins`` (default MASPlugin, whose
            arguments all have defaults).
        train_mb_size: Avalanche's ``train_mb_size`` as plugins read it: the batch size of their
            own passes over an experience (EWC's Fisher, MAS's importances, GEM's memory) and
            the default memory batch of ReplayPlugin. Set it to ``train.batch_size`` to match
            Avalanche's strategy of the same batch size (a strategy does not see the engine's).
        mask_past: mask earlier classes' logits in the cross-entropy term.
    """

    def __init__(self, *, plugin: str = DEFAULT_PLUGIN, train_mb_size: int = 32, mask_past: bool = False,
                 **plugin_args: Any):
        if train_mb_size < 1:
            raise ConfigError("strategy.train_mb_size", f"expected an int >= 1, got {train_mb_size}")
        self.plugin_name = plugin
        self.plugin_args = dict(plugin_args)
        self.plugin = build_plugin(plugin, self.plugin_args)
        # per plugin, so an instance attribute (checks read it from a built strategy)
        self.keeps_parameter_state = plugin in PARAMETER_STATE
        self.mask_past = mask_past
        from avalanche.training.plugins.clock import Clock

        self.host = PluginHost(Clock())
        self.host.train_mb_size = self.host.eval_mb_size = train_mb_size
        self._epoch_open = False
        self._new_rows: int | None = None
        self._memory: tuple[torch.Tensor, torch.Tensor] | None = None
        self._memory_order: list[int] = []
        self._memory_gen = torch.Generator()
        # snapshot tensors already known not to alias a weight (weak: freed ones drop out)
        self._checked: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()

    # -- the callbacks, Avalanche's Clock last as in Avalanche's own templates

    def _call(self, event: str) -> None:
        getattr(self.plugin, event)(self.host)
        if hasattr(self.host.clock, event):
            getattr(self.host.clock, event)(self.host)
        if event in SNAPSHOT_EVENTS:
            self._unalias()

    def _unalias(self) -> None:
        """Turn any snapshot a plugin took that is a *view* of a live weight into a copy.

        Avalanche's SynapticIntelligencePlugin (0.6) snapshots weights as
        ``param.detach().cpu().flatten()``: a copy on CUDA, but on CPU a view of the parameter
        itself, so its anchor and its "old" weights move with every optimizer step, the path
        integral is 0 and the penalty vanishes. Copying such views right after the callback
        that took them gives on CPU what the plugin computes on CUDA.
        """
        live = {p.untyped_storage().data_ptr() for p in self.host.model.parameters()}
        for holder in _param_data(vars(self.plugin)):
            data = holder._data
            if self._checked.get(id(data)) is data:  # this very tensor was checked already
                continue
            if data.untyped_storage().data_ptr() in live:
                holder._data = data = data.clone()
            self._checked[id(data)] = data

    def setup(self, model: nn.Module) -> None:
        self._attach(model)

    def _attach(self, model: nn.Module) -> None:
        self.host.model = model
        self.host.optimizer = _ZeroGrad(model)
        first = next(model.parameters(), None)
        self.host.device = first.device if first is not None else torch.device("cpu")

    def before_task(self, model: nn.Module, task: Task) -> Dataset:
        data = super().before_task(model, task)
        experience = task.experience
        self._attach(model)
        self.host.experience = PluginExperience(experience)
        self.host.is_training = True
        self._call("before_training")
        self._call("before_train_dataset_adaptation")
        self.host.adapted_dataset = self.host.experience.dataset if experience.train is not None else None
        self._call("after_train_dataset_adaptation")
        self.host.dataloader = loader = object()  # a sentinel: did the plugin replace the loader?
        self._call("before_training_exp")
        if self.host.dataloader is not loader and not hasattr(self.plugin, "storage_policy"):
            raise ConfigError("strategy.plugin", f"{self.plugin_name} replaces Avalanche's data loader, "
                                                 f"which clsim's engine does not use")
        self.host.dataloader = None
        self._memory = self._memory_tensors()
        # the memory order is seeded per experience: a resumed run draws the same batches
        self._memory_gen.manual_seed(1_000_003 * (experience.index + 1))
        self._memory_order = []
        self._epoch_open = False
        return data

    def before_epoch(self, model: nn.Module, epoch: int, epochs: int, steps: int) -> None:
        self._close_epoch()
        self.host.train_epochs = epochs
        self._call("before_training_epoch")
        self._epoch_open = True

    def _close_epoch(self) -> None:
        if self._epoch_open:
            self._call("after_training_epoch")
            self._epoch_open = False

    def prepare_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        self._new_rows = len(y)  # rows after these are the memory batch (see ``_ce_logits``)
        if self._memory is not None:
            x, y = self._with_memory_batch(x, y)
        self._set_batch(x, y)
        self._call("before_training_iteration")
        return x, y, None

    def _set_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.host.mbatch = [x, y, torch.zeros_like(y)]  # task label 0: class-incremental

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, extra: Any = None) -> torch.Tensor:
        """The forward pass between ``before_forward`` / ``after_forward``, then cross-entropy over
        the seen classes plus whatever the plugin's ``before_backward`` adds to ``strategy.loss``
        (SI, EWC and MAS penalties, LwF's distillation)."""
        self._set_batch(x, y)
        self._call("before_forward")
        output = self.host.mb_output = model(x)
        self._call("after_forward")
        self.host.loss = F.cross_entropy(self._ce_logits(output), y)
        self._call("before_backward")
        return self.host.loss

    def _ce_logits(self, output: torch.Tensor) -> torch.Tensor:
        """``mask_past`` applies to the new data's rows only: the appended memory rows are
        earlier classes, whose logits at -inf would make their cross-entropy infinite. New
        rows over the new classes, memory rows over all seen ones: ER-ACE's asymmetric
        cross-entropy (Caccia et al., "New Insights on Reducing Abrupt Representation Change
        in Online Continual Learning", ICLR 2022)."""
        n = self._new_rows
        if n is None or n >= len(output):
            return self.training_logits(output)
        return torch.cat([self.training_logits(output[:n]), output[n:]])

    def after_backward(self, model: nn.Module) -> None:
        self._call("after_backward")
        self._call("before_update")

    def after_step(self, model: nn.Module) -> None:
        self._call("after_update")
        self._call("after_training_iteration")

    def after_task(self, model: nn.Module, task: Task, batches: Batches) -> None:
        self._attach(model)
        if self.host.experience is None or self.host.experience.clsim is not task.experience:
            # a federated client consolidates on a strategy restored from its saved state
            self.host.experience = PluginExperience(task.experience)
        self._close_epoch()
        self._call("after_training_exp")
        self._call("after_training")
        self._compact_buffers()
        self.host.mbatch = self.host.mb_output = self.host.loss = None

    # -- replay: Avalanche's ReplayDataLoader appends a memory batch to every data batch

    def _memory_tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        policy = getattr(self.plugin, "storage_policy", None)
        if policy is None or len(policy.buffer) == 0:
            return None
        xs, ys = zip(*[(item[0], int(item[1])) for item in policy.buffer])
        return torch.stack(xs), torch.tensor(ys, dtype=torch.long)

    def _with_memory_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = getattr(self.plugin, "batch_size_mem", None) or self.host.train_mb_size
        mem_x, mem_y = self._memory
        picked = []
        while len(picked) < size:  # cycle through the memory in a fresh random order each pass
            if not self._memory_order:
                self._memory_order = torch.randperm(len(mem_y), generator=self._memory_gen).tolist()
            picked.append(self._memory_order.pop())
        idx = torch.tensor(picked)
        return torch.cat([x, mem_x[idx].to(x.device)]), torch.cat([y, mem_y[idx].to(y.device)])

    def _compact_buffers(self) -> None:
        """Replace each replay buffer by a tensor copy of its items: a checkpoint then holds the
        buffer, not the whole data sets the buffer indexes into."""
        policy = getattr(self.plugin, "storage_policy", None)
        if policy is None:
            return
        from avalanche.benchmarks.utils.classification_dataset import (
            _make_taskaware_tensor_classification_dataset,
        )

        groups = getattr(policy, "buffer_groups", None)
        for buffer in (groups.values() if groups is not None else [policy]):
            items = list(buffer.buffer)
            if not items or not hasattr(buffer, "_buffer"):
                continue
            x = torch.stack([it[0] for it in items])
            y = torch.tensor([int(it[1]) for it in items])
            t = [int(it[-1]) for it in items]
            buffer._buffer = _make_taskaware_tensor_classification_dataset(x, y, task_labels=t, targets=y.tolist())

    # -- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The plugin object (pickled to bytes: checkpoints hold plain data only) and the clock."""
        clock = {k: v for k, v in vars(self.host.clock).items() if isinstance(v, int)}
        return {"plugin_name": self.plugin_name, "plugin": pickle.dumps(self.plugin), "clock": clock}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["plugin_name"] != self.plugin_name:
            raise ConfigError("strategy.plugin", f"the checkpoint holds {state['plugin_name']}, "
                                                 f"the config asks for {self.plugin_name}")
        self.plugin = load_plugin_state(state["plugin"])
        for key, value in state["clock"].items():
            setattr(self.host.clock, key, value)
