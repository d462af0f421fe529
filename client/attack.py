"""A malicious device: what it does to its data, its update and its report.

Why on the device: that is where a real attacker sits. The server sees only what a
poisoned device sends, so every defence (validation, norm bounding, robust
aggregation) is tested against the same bytes it would get in deployment. A device
attacks only if ``task.attack`` names it (seeded from the run's seed and the
population size: the same devices every round); honest devices pass through
untouched, so ``attack.kind = "none"`` changes no byte.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from client.algorithms.loop import DeviceData
from common.config_attack import UPDATE_ATTACKS
from common.models import ModelSpec
from common.protocol import RoundInstructions
from common.seeding import numpy_rng
from common.weights import Arrays


def attacks(task: RoundInstructions, device: int) -> bool:
    """Whether ``device`` is malicious and attacks in this task's round."""
    return task.attack.attacks(task.seed, task.num_devices, task.round, device)


@lru_cache(maxsize=4)
def _num_classes(spec_json: str) -> int:
    return ModelSpec.model_validate_json(spec_json).num_classes


def poison_data(task: RoundInstructions, device: int, data: DeviceData) -> DeviceData:
    """``label_flip``: train on labels ``C-1-y``; the device's own test split stays true
    (its evaluation measures what its users get, not what it claims)."""
    if task.attack.kind != "label_flip" or not attacks(task, device):
        return data
    flipped = _num_classes(task.model_spec) - 1 - data.y_train
    return DeviceData(data.x_train, flipped, data.x_test, data.y_test)


def poison_update(
    task: RoundInstructions, device: int, update: Arrays, global_arrays: Arrays
) -> Arrays:
    """The update a malicious device sends instead of its honest one (float arrays
    only; integer buffers such as batch-norm counters pass through)."""
    a = task.attack
    if a.kind not in UPDATE_ATTACKS or not attacks(task, device):
        return update
    rng = numpy_rng(task.seed, "attack-noise", task.round, device)
    out: Arrays = {}
    for k in sorted(update):
        v = update[k]
        if v.dtype.kind != "f":
            out[k] = v
            continue
        g = global_arrays[k].astype(v.dtype)
        if a.kind == "scale":
            out[k] = g + v.dtype.type(a.scale) * (v - g)
        elif a.kind == "sign_flip":
            out[k] = g - v.dtype.type(a.scale) * (v - g)
        elif a.kind == "noise":
            out[k] = g + rng.normal(0.0, a.noise_std, size=v.shape).astype(v.dtype)
        else:
            out[k] = np.full_like(v, np.nan)
    return out


def reported_examples(task: RoundInstructions, device: int, num_examples: int) -> int:
    """``inflate_count``: claim ``scale`` times the examples, to buy aggregation weight
    (the server weights by the count it knows and rejects the claim)."""
    if task.attack.kind != "inflate_count" or not attacks(task, device):
        return num_examples
    return round(num_examples * task.attack.scale)
