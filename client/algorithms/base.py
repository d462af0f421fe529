"""The shape of a personalization algorithm (after FedJAX: a few explicit steps).

An algorithm says which weights are shared with the server, how a device turns
the global model plus its personal state into an update, and which model is the
device's personalized one. Everything else (data, state I/O, messages) is the
ClientApp's job, so an algorithm is a small module that is easy to test alone.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from client.algorithms.loop import (
    DeviceData,
    ExtraLoss,
    make_optimizer,
    proximal_term,
    train_epochs,
    trainable_only,
)
from client.state import PersonalState
from common.personalization import AlgorithmSpec
from common.protocol import RoundInstructions
from common.weights import Arrays, load_arrays, model_to_arrays


@dataclass
class ClientUpdate:
    """What one round of local work produced."""

    shared: Arrays
    """Weights sent to the server (never data)."""
    state: PersonalState
    """What the device keeps on its own disk."""
    metrics: dict[str, float] = field(default_factory=dict)


class Algorithm:
    """Base class: FedAvg-style full-model training; subclasses override the hooks."""

    spec: ClassVar[AlgorithmSpec]
    """The declaration shared with the server (``common.personalization.ALGORITHMS``)."""

    @property
    def name(self) -> str:
        return self.spec.name

    def personal_keys(self, model: nn.Module) -> set[str]:
        """State-dict keys that stay on the device and are never sent."""
        return self.spec.keeps(list(model.state_dict()))

    def shared_keys(self, model: nn.Module) -> set[str]:
        return set(model.state_dict()) - self.personal_keys(model)

    def load_personalized(
        self, model: nn.Module, global_arrays: Arrays, state: PersonalState | None
    ) -> None:
        """Put the device's personalized model into ``model`` (for evaluation)."""
        load_arrays(model, global_arrays)
        if state is not None:
            load_arrays(model, state.arrays, strict=False)

    def start_from(
        self, model: nn.Module, global_arrays: Arrays, state: PersonalState | None
    ) -> None:
        """Initial weights for local training: global, with personal parts restored."""
        load_arrays(model, global_arrays)
        if state is not None:
            personal = {k: v for k, v in state.arrays.items() if k in self.personal_keys(model)}
            load_arrays(model, personal, strict=False)

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
        extra = (
            proximal_loss(global_arrays, instr.client.proximal_mu) if self.spec.proximal else None
        )
        loss, steps = self.local_train(model, data, instr, generator, extra_loss=extra)
        shared = model_to_arrays(model, self.shared_keys(model))
        new_state = self.new_state(model, state)
        return ClientUpdate(shared, new_state, {"train_loss": loss, "steps": float(steps)})

    def local_train(
        self,
        model: nn.Module,
        data: DeviceData,
        instr: RoundInstructions,
        generator: torch.Generator,
        *,
        epochs: int | None = None,
        keys: Collection[str] | None = None,
        extra_loss: ExtraLoss | None = None,
    ) -> tuple[float, int]:
        """Train ``model`` in place with the round's optimiser; return (mean loss, steps).

        ``epochs`` defaults to ``client.local_epochs``; with ``keys`` only the
        parameters named there are trained (the rest frozen for the call), so a
        method that trains parts of the model in phases reuses the one loop.
        """
        names = keys if keys is not None else [n for n, _ in model.named_parameters()]
        with trainable_only(model, names) as params:
            c = instr.client
            opt = make_optimizer(params, c.lr, c.momentum, c.weight_decay)
            return train_epochs(
                model,
                data.x_train,
                data.y_train,
                epochs=c.local_epochs if epochs is None else epochs,
                batch_size=c.batch_size,
                optimizer=opt,
                generator=generator,
                extra_loss=extra_loss,
                max_steps=instr.max_steps,
            )

    def new_state(self, model: nn.Module, old: PersonalState | None) -> PersonalState:
        """What to keep on disk after training (default: the personal keys)."""
        meta = dict(old.meta) if old else {}
        meta["rounds_trained"] = int(meta.get("rounds_trained", 0)) + 1
        return PersonalState(model_to_arrays(model, self.personal_keys(model)), meta)


def as_tensors(arrays: Arrays) -> dict[str, torch.Tensor]:
    """Read-only torch views of numpy arrays (e.g. the received global model)."""
    return {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}


def proximal_loss(reference: Arrays, mu: float) -> ExtraLoss | None:
    """(mu/2)||w - reference||^2 as an extra loss, or None when ``mu`` is 0."""
    return proximal_term(as_tensors(reference), mu) if mu > 0 else None
