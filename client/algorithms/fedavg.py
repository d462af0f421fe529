"""FedAvg with local fine-tuning (McMahan et al., AISTATS 2017).

The whole model is shared. The personalized model is the device's own locally
trained copy, kept on its disk across rounds: what a device that personalizes
by simply training the served model on its data would use.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from client.algorithms.base import Algorithm
from client.state import PersonalState
from common.personalization import ALGORITHMS, AlgorithmSpec
from common.weights import model_to_arrays


class FedAvg(Algorithm):
    spec: ClassVar[AlgorithmSpec] = ALGORITHMS["fedavg"]

    def start_from(self, model: nn.Module, global_arrays, state: PersonalState | None) -> None:  # type: ignore[no-untyped-def]
        # Every round starts from the served global model (nothing is personal).
        super().start_from(model, global_arrays, None)

    def new_state(self, model: nn.Module, old: PersonalState | None) -> PersonalState:
        meta = dict(old.meta) if old else {}
        meta["rounds_trained"] = int(meta.get("rounds_trained", 0)) + 1
        return PersonalState(model_to_arrays(model), meta)
