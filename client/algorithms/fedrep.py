"""FedRep (Collins et al., "Exploiting Shared Representations for Personalized
Federated Learning", ICML 2021, arXiv:2102.07078): personal head, shared body,
trained one after the other.

Each round the device first fits its own head to the served body (body frozen,
``instr.head_epochs`` epochs), then trains the body under that head (head frozen,
``instr.local_epochs`` epochs) and sends the body only. Why two phases: the
representation is learned against heads that already fit each device, so the
body update is about the representation, not about re-fitting the classifier.
Which keys are the head is decided in ``common.personalization`` (as for FedPer).
The personalized model is the global body under the device's head (base class).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from client.algorithms.base import Algorithm, ClientUpdate
from client.algorithms.loop import DeviceData
from client.state import PersonalState
from common.personalization import ALGORITHMS, AlgorithmSpec
from common.protocol import RoundInstructions
from common.weights import Arrays, model_to_arrays


class FedRep(Algorithm):
    spec: ClassVar[AlgorithmSpec] = ALGORITHMS["fedrep"]

    def client_update(
        self,
        model: nn.Module,
        global_arrays: Arrays,
        state: PersonalState | None,
        data: DeviceData,
        instr: RoundInstructions,
        generator: torch.Generator,
    ) -> ClientUpdate:
        self.start_from(model, global_arrays, state)
        head, body = self.personal_keys(model), self.shared_keys(model)
        head_loss, head_steps = self.local_train(
            model, data, instr, generator, epochs=instr.client.head_epochs, keys=head
        )
        loss, steps = self.local_train(model, data, instr, generator, keys=body)
        metrics = {
            "train_loss": loss,
            "head_loss": head_loss,
            "steps": float(head_steps + steps),
        }
        return ClientUpdate(model_to_arrays(model, body), self.new_state(model, state), metrics)
