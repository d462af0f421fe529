"""Personalization algorithms, one small module each, over one training loop.

To add one: subclass ``Algorithm`` in a new module, override the hooks that
differ (what is personal, the loss term, the personalized model), and register
it in ``ALGORITHMS`` below (and in ``common.config.AlgorithmName``).
"""

from __future__ import annotations

from client.algorithms.base import Algorithm, ClientUpdate
from client.algorithms.fedavg import FedAvg
from client.algorithms.fedper import FedPer

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (FedAvg, FedPer)}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]()
    except KeyError:
        raise ValueError(
            f"unknown client.algorithm '{name}': choose one of {sorted(ALGORITHMS)}"
        ) from None


__all__ = ["ALGORITHMS", "Algorithm", "ClientUpdate", "get_algorithm"]
