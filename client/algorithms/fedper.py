"""FedPer (Arivazhagan et al., 2019, arXiv:1912.00818): personal head, shared body.

The head (``head.*``) never leaves the device; only the body is averaged. The
personalized model is the current global body under the device's own head.
"""

from __future__ import annotations

from typing import ClassVar

from client.algorithms.base import Algorithm
from common.personalization import ALGORITHMS, AlgorithmSpec


class FedPer(Algorithm):
    # What is personal (the ``head.*`` keys) is decided in common.personalization,
    # shared with the server, so the server knows which keys to expect back.
    spec: ClassVar[AlgorithmSpec] = ALGORITHMS["fedper"]
