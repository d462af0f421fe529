"""Which weights stay on a device, by algorithm: one answer for server and device.

The server must know what to expect back (to validate updates and to aggregate
only shared weights); the device must know what never to send. Deciding it in
one place keeps the two from drifting apart.
"""

from __future__ import annotations

from collections.abc import Iterable

HEAD_PREFIX = "head."


def batchnorm_keys(keys: Iterable[str]) -> set[str]:
    """State-dict keys of batch-norm layers (weights and running statistics)."""
    keys = list(keys)
    layers = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".running_mean")}
    return {k for k in keys if k.rsplit(".", 1)[0] in layers}


def personal_keys(algorithm: str, keys: Iterable[str]) -> set[str]:
    """Keys that ``algorithm`` keeps on the device and never sends."""
    keys = list(keys)
    if algorithm in ("fedper", "fedrep"):
        return {k for k in keys if k.startswith(HEAD_PREFIX)}
    if algorithm == "fedbn":
        return batchnorm_keys(keys)
    return set()


def shared_keys(algorithm: str, keys: Iterable[str]) -> set[str]:
    keys = list(keys)
    return set(keys) - personal_keys(algorithm, keys)
