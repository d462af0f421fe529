"""Ditto (Li et al., "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021, arXiv:2012.04685): a personal model pulled toward the
global one.

Two models per device. The global update trains the received global model ``w`` as
FedAvg does and sends it. The personal model ``v`` (the device's own, kept on its
disk, initialised from the global model the first time) is trained on
``F_k(v) + (lambda/2)||v - w||^2`` with ``w`` the *received* global model and
``lambda = instr.ditto_lambda``: lambda = 0 is pure local training, a large lambda
ties ``v`` to the global model. Why: the regulariser interpolates between local
and global models per device, which the paper shows gives both accuracy and
robustness. Following the paper's Algorithm 1, ``v`` gets the same amount of local
work as ``w`` (``instr.local_epochs`` epochs), and both start from the received
``w`` (so their order does not matter); the device does twice FedAvg's compute.
The personalized model is ``v``; everything ``w`` holds is sent (nothing is
withheld from the server, so ``personal_keys`` is empty).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from client.algorithms.base import Algorithm, ClientUpdate, proximal_loss
from client.algorithms.loop import DeviceData
from client.state import PersonalState
from common.personalization import ALGORITHMS, AlgorithmSpec
from common.protocol import RoundInstructions
from common.weights import Arrays, load_arrays, model_to_arrays


class Ditto(Algorithm):
    spec: ClassVar[AlgorithmSpec] = ALGORITHMS["ditto"]

    def client_update(
        self,
        model: nn.Module,
        global_arrays: Arrays,
        state: PersonalState | None,
        data: DeviceData,
        instr: RoundInstructions,
        generator: torch.Generator,
    ) -> ClientUpdate:
        # Personal model v: last round's v (or the global model), pulled toward w.
        load_arrays(model, global_arrays)
        if state is not None and state.arrays:
            load_arrays(model, state.arrays, strict=False)
        pull = proximal_loss(global_arrays, instr.client.ditto_lambda)
        personal_loss, personal_steps = self.local_train(
            model, data, instr, generator, extra_loss=pull
        )
        new_state = self.new_state(model, state)
        # Global update: the received model trained as plain FedAvg (Ditto's global
        # objective; no proximal term, whatever the server-side strategy).
        load_arrays(model, global_arrays)
        loss, steps = self.local_train(model, data, instr, generator)
        metrics = {
            "train_loss": loss,
            "personal_loss": personal_loss,
            "steps": float(steps + personal_steps),
        }
        return ClientUpdate(model_to_arrays(model, self.shared_keys(model)), new_state, metrics)

    def new_state(self, model: nn.Module, old: PersonalState | None) -> PersonalState:
        """The whole personal model v (``model`` holds v when this is called)."""
        meta = dict(old.meta) if old else {}
        meta["rounds_trained"] = int(meta.get("rounds_trained", 0)) + 1
        return PersonalState(model_to_arrays(model), meta)
