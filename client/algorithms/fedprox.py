"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
arXiv:1812.06127): FedAvg with a proximal term on the device.

Each device minimises ``F_k(w) + (mu/2)||w - w_global||^2``: the term keeps a
device's update near the served model when devices' data (and amount of local
work) differ, which is what makes FedAvg drift. ``mu`` is ``client.proximal_mu``.
Its spec declares ``proximal=True``, which is what makes the one training loop add
the term (no other algorithm gets it, whatever the server's strategy); the
personalized model is the device's locally trained copy, as for FedAvg.
"""

from __future__ import annotations

from typing import ClassVar

from client.algorithms.fedavg import FedAvg
from common.personalization import ALGORITHMS, AlgorithmSpec


class FedProx(FedAvg):
    spec: ClassVar[AlgorithmSpec] = ALGORITHMS["fedprox"]
