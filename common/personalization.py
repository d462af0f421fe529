"""What each algorithm keeps on the device: one declaration for server and device.

The server must know what to expect back (to validate updates and aggregate only
shared weights); the device must know what never to send. Each algorithm declares
its rule here, once; the device's ``Algorithm`` class takes its spec from this
table and the server looks it up by the configured name, so there is no string
branch to drift apart (a test checks this table, the config's names and the
device's registry agree).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

HEAD_PREFIX = "head."

KeepRule = Callable[[list[str]], set[str]]
"""State-dict keys -> the keys that stay on the device."""


def keep_nothing(keys: list[str]) -> set[str]:
    return set()


def keep_head(keys: list[str]) -> set[str]:
    """The classifier head (``head.*``): FedPer and FedRep share the body only."""
    return {k for k in keys if k.startswith(HEAD_PREFIX)}


def batchnorm_keys(keys: Iterable[str]) -> set[str]:
    """State-dict keys of batch-norm layers (weights and running statistics)."""
    keys = list(keys)
    layers = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".running_mean")}
    return {k for k in keys if k.rsplit(".", 1)[0] in layers}


PhaseRule = Callable[[int, int], tuple[int, ...]]
"""(local_epochs, head_epochs) -> epochs of each local training pass, in order."""


def one_phase(epochs: int, head_epochs: int) -> tuple[int, ...]:
    return (epochs,)


def head_then_body(epochs: int, head_epochs: int) -> tuple[int, ...]:
    """FedRep: the head alone, then the body."""
    return (head_epochs, epochs)


def personal_and_global(epochs: int, head_epochs: int) -> tuple[int, ...]:
    """Ditto: the personal model, then the global copy."""
    return (epochs, epochs)


@dataclass(frozen=True)
class AlgorithmSpec:
    """What the server and the device both need to know of an algorithm."""

    name: str
    keeps: KeepRule
    """Which weights never leave the device."""
    proximal: bool = False
    """Whether local training adds FedProx's (mu/2)||w - w_global||^2 (``client.proximal_mu``)."""
    needs_head: bool = False
    """Keeps the head personal, so a model that is all head (logistic) shares nothing."""
    trains_from_state: bool = True
    """Local training reads the device's stored arrays (False: it starts from the global
    model alone, so a worker reads only the state's small metadata before training)."""
    phases: PhaseRule = one_phase
    """Epochs of each local training pass, from (local_epochs, head_epochs): what the
    virtual clock charges a device for, and where a partial-work step budget is split."""


ALGORITHMS: dict[str, AlgorithmSpec] = {
    s.name: s
    for s in (
        AlgorithmSpec("fedavg", keep_nothing, trains_from_state=False),
        AlgorithmSpec("fedprox", keep_nothing, proximal=True, trains_from_state=False),
        AlgorithmSpec("fedper", keep_head, needs_head=True),
        AlgorithmSpec("fedrep", keep_head, needs_head=True, phases=head_then_body),
        AlgorithmSpec("fedbn", batchnorm_keys),
        AlgorithmSpec("ditto", keep_nothing, phases=personal_and_global),
        AlgorithmSpec("apfl", keep_nothing),
    )
}


def algorithm_spec(name: str) -> AlgorithmSpec:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(
            f"unknown client.algorithm '{name}': choose one of {sorted(ALGORITHMS)}"
        ) from None


def personal_keys(algorithm: str, keys: Iterable[str]) -> set[str]:
    """Keys that ``algorithm`` keeps on the device and never sends."""
    return algorithm_spec(algorithm).keeps(list(keys))


def shared_keys(algorithm: str, keys: Iterable[str]) -> set[str]:
    keys = list(keys)
    return set(keys) - personal_keys(algorithm, keys)


def local_steps(
    algorithm: str, num_examples: int, local_epochs: int, head_epochs: int, batch_size: int
) -> tuple[int, ...]:
    """Optimiser steps of each local pass of a device with ``num_examples`` samples (the
    device's loop takes ceil(n / batch) steps per epoch; a test checks they agree)."""
    per_epoch = -(-num_examples // batch_size)
    return tuple(e * per_epoch for e in algorithm_spec(algorithm).phases(local_epochs, head_epochs))
