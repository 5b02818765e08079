"""Every random stream of a run, named in one place.

A run draws from many independent streams, each a pure function of the config's ``seed`` and
a few ints, so that a resumed run, a federated client and a local run draw the same numbers
for the same work. :func:`derive_seed` turns ``(seed, *parts)`` into one 63-bit seed; the tags
below are the ``parts`` that tell the streams apart. Their values are part of every result ever
produced: change one and every number that drew from it changes.

    stream                                  seed
    experience i: head growth, before_task  derive_seed(seed, i)
    experience i, epoch e: batch order      derive_seed(seed, i, e)
    experience i: dropout, augmentation     derive_seed(seed, i, FIT)
    experience i: after_task (Fisher pass)  derive_seed(seed, i, AFTER_TASK)
    federated client k, round r of exp. i   the experience stream i + T * (r + R * k) above
    partition of exp. i's train / test set  derive_seed(seed, i, PARTITION[split])
    server's public hold-out of exp. i      derive_seed(seed, i, PUBLIC_SPLIT)
    reads of the public set at step t       derive_seed(seed, t, PUBLIC_READS)
    client k's experience order             default_rng([seed, k, CLIENT_ORDER])
    clients sampled at step s               default_rng([seed, s, CLIENT_SAMPLE])
    fleet tiers of the clients              default_rng([seed, FLEET_TIERS])
    fleet faults, availability              default_rng([seed, step, client, code(what)])
    class order, long-tail subsampling      default_rng(seed), default_rng([seed, 1])
"""

from __future__ import annotations

import numpy as np

FIT = 1_000_003
AFTER_TASK = 2_000_003
PARTITION = {"train": 0, "test": 1}
PUBLIC_SPLIT = 7
PUBLIC_READS = 7_000_001
CLIENT_ORDER = 5
CLIENT_SAMPLE = 11
FLEET_TIERS = 7


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints: one independent stream per (seed, experience, epoch, ...)."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def seed_torch(seed: int) -> None:
    """``torch.manual_seed(seed)``, without its cost on a machine with no accelerator.

    ``torch.manual_seed`` also queues the seeding of CUDA, XPU and MTIA, and while those are
    uninitialised each queued call records a formatted stack trace: ~2 ms a call, and a
    federated run seeds ~200 times (every client build and fit). Where no accelerator exists
    those queued seeds never run, so seeding the CPU generator alone draws the same numbers.
    """
    import torch

    if torch.accelerator.is_available():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(int(seed))
