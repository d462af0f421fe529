"""The one training loop every personalization algorithm plugs into.

Algorithms differ in what is personal and in an extra loss term; the loop (batches,
optimiser, loss) is written once. Batching is done by hand from in-memory tensors
with a seeded permutation: a DataLoader per call costs more than a small device's
whole epoch, and the seeded permutation makes each device's run reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from common.evaluation import evaluate


@dataclass(frozen=True)
class DeviceData:
    """One device's private data, already as tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


__all__ = ["DeviceData", "evaluate", "make_optimizer", "proximal_term", "train_epochs"]

ExtraLoss = Callable[[nn.Module], torch.Tensor]


def make_optimizer(
    params: Iterable[nn.Parameter], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(params), lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    extra_loss: ExtraLoss | None = None,
) -> tuple[float, int]:
    """Run ``epochs`` passes of minibatch SGD; return (mean loss, steps taken)."""
    model.train()
    n = x.shape[0]
    total, steps = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
    return total / max(steps, 1), steps


def proximal_term(reference: dict[str, torch.Tensor], mu: float) -> ExtraLoss:
    """FedProx's (mu/2)||w - w_ref||^2 over the parameters named in ``reference``."""

    def term(model: nn.Module) -> torch.Tensor:
        acc = torch.zeros(())
        for name, p in model.named_parameters():
            ref = reference.get(name)
            if ref is not None:
                acc = acc + (p - ref).pow(2).sum()
        return 0.5 * mu * acc

    return term
