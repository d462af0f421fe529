"""APFL (Deng, Kamani, Mahdavi, "Adaptive Personalized Federated Learning", 2020,
arXiv:2003.13461): a personal model mixed with the global one by a learned weight.

The device keeps a personal model ``v`` and a mixing weight ``alpha`` in [0, 1]
(``PersonalState.meta["apfl_alpha"]``, initially ``instr.apfl_alpha``; ``v`` starts
as the global model). On every batch, as in the paper's Algorithm 1, all three are
updated from the same point:

- ``w`` (the device's copy of the received global model) by SGD on ``F_k(w)``;
- ``v`` by SGD on ``F_k(alpha*v + (1-alpha)*w)``, the gradient taken w.r.t. ``v``
  only (``w`` is held fixed inside the mixture, so ``w`` learns from its own loss);
- ``alpha`` by gradient descent on the same mixed loss with lr
  ``instr.apfl_alpha_lr``, then clipped to [0, 1] (projected gradient descent).

So one epoch is one pass over the data. ``w`` is sent (nothing is withheld:
``personal_keys`` is empty). Why: ``alpha`` learns per device how much of the
global model to trust, so devices whose data look like everyone's lean on it and
outliers lean on ``v``.

Personalized model (design choice): the parameter mixture
``alpha*v + (1-alpha)*w`` with ``w`` the *current global model at evaluation time*,
not the device's last local ``w``. Why: after a round the device's ``w`` is
superseded by the aggregate it helped build, the paper mixes with the synchronised
``w`` too, and the device then stores only ``v`` and ``alpha``, not a second full
model. Buffers (batch-norm running statistics) come from ``v``, whose statistics
were gathered on the mixed model's activations.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from client.algorithms.base import Algorithm, ClientUpdate
from client.algorithms.loop import DeviceData, make_optimizer, train_epochs
from client.state import PersonalState
from common.personalization import ALGORITHMS, AlgorithmSpec
from common.protocol import RoundInstructions
from common.weights import Arrays, load_arrays, model_to_arrays

ALPHA_KEY = "apfl_alpha"


class _APFLPair(nn.Module):
    """``w``, ``v`` and ``alpha`` as one module, so the one training loop steps all three."""

    def __init__(self, w: nn.Module, v: nn.Module, alpha: float) -> None:
        super().__init__()
        self.w = w
        self.v = v
        self.alpha = nn.Parameter(torch.tensor(alpha, dtype=torch.float32))
        self.loss_sums = [0.0, 0.0]  # (loss of w, mixed loss), for metrics

    def mixed_parameters(self) -> dict[str, torch.Tensor]:
        """alpha*v + (1-alpha)*w with w detached: the mixture's gradient reaches v and alpha."""
        w = dict(self.w.named_parameters())
        a = self.alpha
        return {n: a * p + (1 - a) * w[n].detach() for n, p in self.v.named_parameters()}

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss_w = F.cross_entropy(self.w(x), y)
        loss_mix = F.cross_entropy(functional_call(self.v, self.mixed_parameters(), (x,)), y)
        self.loss_sums[0] += float(loss_w.detach())
        self.loss_sums[1] += float(loss_mix.detach())
        # The terms share no parameter with a gradient path, so one backward of the
        # sum gives each part exactly its own gradient.
        return loss_w + loss_mix

    def clip_alpha(self) -> None:
        with torch.no_grad():
            self.alpha.clamp_(0.0, 1.0)


class APFL(Algorithm):
    spec: ClassVar[AlgorithmSpec] = ALGORITHMS["apfl"]

    @staticmethod
    def alpha_of(state: PersonalState | None, default: float) -> float:
        if state is None or ALPHA_KEY not in state.meta:
            return default
        return float(state.meta[ALPHA_KEY])

    def client_update(
        self,
        model: nn.Module,
        global_arrays: Arrays,
        state: PersonalState | None,
        data: DeviceData,
        instr: RoundInstructions,
        generator: torch.Generator,
    ) -> ClientUpdate:
        load_arrays(model, global_arrays)  # w: the device's copy of the global model
        personal = copy.deepcopy(model)  # v: the global model the first time
        if state is not None and state.arrays:
            load_arrays(personal, state.arrays, strict=False)
        pair = _APFLPair(model, personal, self.alpha_of(state, instr.client.apfl_alpha))
        opt = make_optimizer(
            [*model.parameters(), *personal.parameters()],
            instr.client.lr,
            instr.client.momentum,
            instr.client.weight_decay,
        )
        # alpha: its own lr, plain projected gradient descent (no momentum, no decay).
        alpha_group = {"params": [pair.alpha], "lr": instr.client.apfl_alpha_lr, "momentum": 0.0}
        opt.add_param_group({**alpha_group, "weight_decay": 0.0})
        _, steps = train_epochs(
            pair,
            data.x_train,
            data.y_train,
            epochs=instr.client.local_epochs,
            batch_size=instr.client.batch_size,
            optimizer=opt,
            generator=generator,
            batch_loss=lambda _pair, x, y: pair.batch_loss(x, y),
            after_step=pair.clip_alpha,
            max_steps=instr.max_steps,
        )
        alpha = float(pair.alpha.detach())
        meta = dict(state.meta) if state else {}
        meta["rounds_trained"] = int(meta.get("rounds_trained", 0)) + 1
        meta[ALPHA_KEY] = alpha
        n = max(steps, 1)
        metrics = {
            "train_loss": pair.loss_sums[0] / n,
            "personal_loss": pair.loss_sums[1] / n,
            "apfl_alpha": alpha,
            "steps": float(steps),
        }
        return ClientUpdate(
            model_to_arrays(model, self.shared_keys(model)),
            PersonalState(model_to_arrays(personal), meta),
            metrics,
        )

    def load_personalized(
        self, model: nn.Module, global_arrays: Arrays, state: PersonalState | None
    ) -> None:
        """alpha*v + (1-alpha)*w_global as parameters; buffers from v (see module doc).

        A device without a personal model yet (or without an alpha) gets the global model.
        """
        load_arrays(model, global_arrays)
        if state is None or not state.arrays or ALPHA_KEY not in state.meta:
            return
        alpha = float(state.meta[ALPHA_KEY])
        params = {n for n, _ in model.named_parameters()}
        mixed: Arrays = {}
        for k, v in state.arrays.items():
            if k in params:
                mix = alpha * v.astype(np.float64) + (1.0 - alpha) * global_arrays[k]
                mixed[k] = mix.astype(v.dtype)
            else:
                mixed[k] = v
        load_arrays(model, mixed, strict=False)
