"""Scenario builders: class-incremental, long-tailed, and long-tailed class-incremental.

Each builder is registered; its keyword-only parameters are the YAML ``scenario`` section.
Positional parameters (the source and the experiment seed) are supplied by clsim.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from clsim.data.base import Source, View
from clsim.errors import ConfigError
from clsim.registry import SCENARIOS
from clsim.scenarios.base import Experience, Scenario

ClassOrder = Literal["random", "sorted"] | list[int]


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> np.ndarray:
    """Exponential profile n_c = floor(n_max * rho^(-c / (C - 1))), c = 0..C-1 (Cui et al. 2019)."""
    c = np.arange(num_classes)
    exponent = c / max(num_classes - 1, 1)
    # round first: 64 * 64**(-5/6) is 1.9999999999999996 in floating point and must floor to 2
    return np.floor(np.round(n_max * imbalance_ratio ** (-exponent), 6)).astype(np.int64)


def resolve_class_order(order: ClassOrder, num_classes: int, seed: int) -> np.ndarray:
    """The class order: a permutation by ``seed``, sorted, or the user's explicit list."""
    if order == "random":
        return np.random.default_rng(seed).permutation(num_classes)
    if order == "sorted":
        return np.arange(num_classes)
    given = np.asarray(order, dtype=np.int64)
    if sorted(given.tolist()) != list(range(num_classes)):
        raise ConfigError("scenario.class_order",
                          f"expected a permutation of 0..{num_classes - 1}, got {list(order)}")
    return given


def split_classes(
    num_classes: int, *, n_tasks: int | None, classes_per_task: list[int] | None,
    first_task_classes: int | None,
) -> list[int]:
    """How many classes each task gets."""
    if classes_per_task is not None and n_tasks is not None:
        raise ConfigError("scenario.n_tasks", "give either n_tasks or classes_per_task, not both")
    if classes_per_task is not None:
        if min(classes_per_task, default=0) < 1 or sum(classes_per_task) > num_classes:
            raise ConfigError("scenario.classes_per_task", f"expected ints >= 1 summing to at most "
                              f"{num_classes} (the classes in the data), got {classes_per_task}")
        return list(classes_per_task)
    n_tasks = 5 if n_tasks is None else n_tasks
    if not 1 <= n_tasks <= num_classes:
        raise ConfigError("scenario.n_tasks", f"expected an int in [1, {num_classes}] "
                          f"(the classes in the data), got {n_tasks}")
    if first_task_classes is None:
        return [len(part) for part in np.array_split(np.arange(num_classes), n_tasks)]
    rest = num_classes - first_task_classes
    if first_task_classes < 1 or rest < n_tasks - 1 or (n_tasks == 1 and rest):
        raise ConfigError("scenario.first_task_classes", f"expected an int leaving at least one "
                          f"class per remaining task, got {first_task_classes}")
    tail = [len(p) for p in np.array_split(np.arange(rest), n_tasks - 1)] if n_tasks > 1 else []
    return [first_task_classes, *tail]


def _select(
    targets: np.ndarray, classes: np.ndarray, rng: np.random.Generator, caps: np.ndarray | None
) -> np.ndarray:
    """Indices of ``classes`` in ``targets``; at most ``caps[c]`` per class, drawn by ``rng``."""
    picked = []
    for c in classes:
        idx = np.nonzero(targets == c)[0]
        if caps is not None and caps[c] < len(idx):
            idx = np.sort(rng.permutation(idx)[: caps[c]])
        picked.append(idx)
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _caps(counts: np.ndarray, limit: int | None, key: str) -> np.ndarray | None:
    if limit is None:
        return None
    if limit < 1:
        raise ConfigError(f"scenario.{key}", f"expected an int >= 1, got {limit}")
    return np.minimum(counts, limit)


def build_stream(
    source: Source, seed: int, *, task_sizes: list[int], class_order: ClassOrder,
    train_caps: np.ndarray | None, max_test_per_class: int | None, long_tailed: bool = False,
) -> Scenario:
    """Experiences over ``source``: task t gets the next ``task_sizes[t]`` classes of the order."""
    C = source.num_classes
    order = resolve_class_order(class_order, C, seed)[: sum(task_sizes)]
    label_map = np.full(C, -1, dtype=np.int64)
    label_map[order] = np.arange(len(order))
    train_t, test_t = source.targets("train"), source.targets("test")
    test_caps = _caps(np.bincount(test_t, minlength=C), max_test_per_class, "max_test_per_class")
    rng = np.random.default_rng([seed, 1])
    experiences, start = [], 0
    for index, size in enumerate(task_sizes):
        classes = order[start : start + size]
        train = View(source.train, _select(train_t, classes, rng, train_caps), label_map)
        test = View(source.test, _select(test_t, classes, rng, test_caps), label_map)
        experiences.append(Experience(index, tuple(range(start, start + size)), train, test))
        start += size
    kept = train_caps if train_caps is not None else np.bincount(train_t, minlength=C)
    return Scenario(
        experiences=tuple(experiences),
        class_order=tuple(int(c) for c in order),
        class_names=tuple(source.class_names[c] for c in order),
        train_counts=kept[order],
        input_shape=source.input_shape,
        long_tailed=long_tailed,
    )


def long_tail_caps(source: Source, imbalance_ratio: float, n_max: int | None) -> np.ndarray:
    """Per-source-label training caps following the exponential long-tail profile."""
    if imbalance_ratio < 1:
        raise ConfigError("scenario.imbalance_ratio", f"expected a number >= 1, got {imbalance_ratio}")
    available = np.bincount(source.targets("train"), minlength=source.num_classes)
    n_max = int(available.min()) if n_max is None else n_max
    if not 1 <= n_max <= available.min():
        raise ConfigError("scenario.n_max", f"expected an int in [1, {available.min()}] "
                          f"(the smallest class in the data), got {n_max}")
    return np.maximum(long_tail_counts(n_max, source.num_classes, imbalance_ratio), 1)


@SCENARIOS.register("class_incremental")
def class_incremental(
    source: Source, seed: int, /, *,
    n_tasks: int | None = None,
    classes_per_task: list[int] | None = None,
    first_task_classes: int | None = None,
    class_order: ClassOrder = "random",
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
) -> Scenario:
    """Class-incremental stream: disjoint groups of classes, one group per experience.

    Args:
        n_tasks: number of experiences (default 5); classes are spread as evenly as possible.
        classes_per_task: explicit class count per experience (instead of n_tasks).
        first_task_classes: a larger first experience; the rest split the remaining classes.
        class_order: 'random' (by the experiment seed), 'sorted', or a list of labels.
        max_train_per_class: cap on training images per class (smoke runs use 16).
        max_test_per_class: cap on test images per class (smoke runs use 8).
    """
    sizes = split_classes(source.num_classes, n_tasks=n_tasks, classes_per_task=classes_per_task,
                          first_task_classes=first_task_classes)
    counts = np.bincount(source.targets("train"), minlength=source.num_classes)
    return build_stream(source, seed, task_sizes=sizes, class_order=class_order,
                        train_caps=_caps(counts, max_train_per_class, "max_train_per_class"),
                        max_test_per_class=max_test_per_class)


@SCENARIOS.register("long_tailed")
def long_tailed(
    source: Source, seed: int, /, *,
    imbalance_ratio: float = 100.0,
    n_max: int | None = None,
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
) -> Scenario:
    """One long-tailed experience: class c keeps n_max * rho^(-c/(C-1)) training images.

    The test set stays balanced. Class 0 is the head, as in CIFAR-LT (Cui et al. 2019).

    Args:
        imbalance_ratio: rho = n_max / n_min, >= 1 (100 is the common benchmark setting).
        n_max: images of the largest class (default: the smallest class count in the data).
        max_train_per_class: a further cap on training images per class (smoke runs).
        max_test_per_class: cap on test images per class (smoke runs).
    """
    return long_tailed_class_incremental(
        source, seed, imbalance_ratio=imbalance_ratio, n_max=n_max, n_tasks=1,
        class_order="sorted", max_train_per_class=max_train_per_class,
        max_test_per_class=max_test_per_class,
    )


@SCENARIOS.register("long_tailed_class_incremental")
def long_tailed_class_incremental(
    source: Source, seed: int, /, *,
    imbalance_ratio: float = 100.0,
    n_max: int | None = None,
    n_tasks: int | None = None,
    classes_per_task: list[int] | None = None,
    first_task_classes: int | None = None,
    class_order: ClassOrder = "random",
    max_train_per_class: int | None = None,
    max_test_per_class: int | None = None,
) -> Scenario:
    """Long-tailed class-incremental: the long-tail profile over source labels, then split into tasks.

    Args:
        imbalance_ratio: rho = n_max / n_min, >= 1.
        n_max: images of the largest class (default: the smallest class count in the data).
        n_tasks: number of experiences (default 5).
        classes_per_task: explicit class count per experience (instead of n_tasks).
        first_task_classes: a larger first experience.
        class_order: 'random' (by the experiment seed), 'sorted', or a list of labels.
        max_train_per_class: a further cap on training images per class (smoke runs).
        max_test_per_class: cap on test images per class (smoke runs).
    """
    caps = long_tail_caps(source, imbalance_ratio, n_max)
    if max_train_per_class is not None:
        caps = _caps(caps, max_train_per_class, "max_train_per_class")
    sizes = split_classes(source.num_classes, n_tasks=n_tasks, classes_per_task=classes_per_task,
                          first_task_classes=first_task_classes)
    return build_stream(source, seed, task_sizes=sizes, class_order=class_order,
                        train_caps=caps, max_test_per_class=max_test_per_class,
                        long_tailed=imbalance_ratio > 1)
