"""Personalization algorithms, one small module each, over one training loop.

To add one: subclass ``Algorithm`` in a new module, override the hooks that
differ (what is personal, the loss term, the personalized model), and register
it in ``ALGORITHMS`` below; declare what it keeps on the device in
``common.personalization.ALGORITHMS`` and add its name to ``common.config.AlgorithmName``
(a test checks the three agree). To train only
part of the model, pass ``keys=`` to ``Algorithm.local_train``; for a batch
objective over several models, ``train_epochs(batch_loss=..., after_step=...)``.
"""

from __future__ import annotations

from client.algorithms.apfl import APFL
from client.algorithms.base import Algorithm, ClientUpdate
from client.algorithms.ditto import Ditto
from client.algorithms.fedavg import FedAvg
from client.algorithms.fedbn import FedBN
from client.algorithms.fedper import FedPer
from client.algorithms.fedprox import FedProx
from client.algorithms.fedrep import FedRep

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.spec.name: cls for cls in (FedAvg, FedProx, FedPer, FedRep, FedBN, Ditto, APFL)
}


def get_algorithm(name: str) -> Algorithm:
    """A fresh instance: algorithms hold per-call state (APFL's loss sums)."""
    try:
        return ALGORITHMS[name]()
    except KeyError:
        raise ValueError(
            f"unknown client.algorithm '{name}': choose one of {sorted(ALGORITHMS)}"
        ) from None


__all__ = ["ALGORITHMS", "Algorithm", "ClientUpdate", "get_algorithm"]
