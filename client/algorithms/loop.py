"""The one training loop every personalization algorithm plugs into.

Algorithms differ in what is personal and in an extra loss term; the loop (batches,
optimiser, loss) is written once. Batching is done by hand from in-memory tensors
with a seeded permutation: a DataLoader per call costs more than a small device's
whole epoch, and the seeded permutation makes each device's run reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from common.scoring import evaluate


@dataclass(frozen=True)
class DeviceData:
    """One device's private data, already as tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


__all__ = [
    "BatchLoss",
    "DeviceData",
    "ExtraLoss",
    "cross_entropy_loss",
    "evaluate",
    "make_optimizer",
    "proximal_term",
    "train_epochs",
    "trainable_only",
]

ExtraLoss = Callable[[nn.Module], torch.Tensor]
"""A term added to every batch's loss that depends on the model only (e.g. proximal)."""
BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""The loss of one batch ``(model, x, y)``; the default is cross-entropy of ``model(x)``."""


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


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
    batch_loss: BatchLoss | None = None,
    after_step: Callable[[], None] | None = None,
    max_steps: int = 0,
) -> tuple[float, int]:
    """Run ``epochs`` passes of minibatch SGD; return (mean loss, steps taken).

    ``batch_loss`` replaces the cross-entropy of ``model(x)`` for methods whose batch
    objective involves more than one model (APFL); ``after_step`` runs after every
    optimiser step (e.g. a projection such as clipping APFL's alpha to [0, 1]);
    ``max_steps`` > 0 stops early (a straggler's partial work before a deadline).
    """
    loss_of = batch_loss if batch_loss is not None else cross_entropy_loss
    model.train()
    n = x.shape[0]
    total, steps = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            if max_steps and steps >= max_steps:
                break
            idx = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(model, x[idx], y[idx])
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
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


@contextmanager
def trainable_only(model: nn.Module, names: Collection[str]) -> Iterator[list[nn.Parameter]]:
    """Freeze every parameter not named in ``names`` for the block; yield the trainable ones.

    Why: methods that train one part of the model at a time (FedRep's head phase,
    then body phase) build their optimiser over the yielded parameters only, so
    momentum and weight decay never touch the frozen part, and frozen parameters
    get no gradient. Gradients still flow *through* frozen layers to trainable ones.
    Buffers (batch-norm running statistics) are not parameters and still follow
    the data in train mode. ``requires_grad`` is restored on exit, even on error.
    """
    wanted = set(names)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    chosen = [p for name, p in model.named_parameters() if name in wanted and before[name]]
    if not chosen:
        raise ValueError(f"no trainable parameter of the model is named in {sorted(wanted)[:3]}")
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(name in wanted and before[name])
        yield chosen
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(before[name])
