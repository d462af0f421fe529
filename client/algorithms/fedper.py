"""FedPer (Arivazhagan et al., 2019, arXiv:1912.00818): personal head, shared body.

The head (``head.*``) never leaves the device; only the body is averaged. The
personalized model is the current global body under the device's own head.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from client.algorithms.base import Algorithm


class FedPer(Algorithm):
    name: ClassVar[str] = "fedper"

    def personal_keys(self, model: nn.Module) -> set[str]:
        return {k for k in model.state_dict() if k.startswith("head.")}
