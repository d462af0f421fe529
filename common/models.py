"""Model zoo: logistic regression, McMahan et al.'s 2NN and CNN.

Every model is ``Sequential(body, head)`` with parameter names prefixed
``body.`` / ``head.``, so personalization methods (FedPer, FedRep) can say what is
personal by prefix alone, and the split is the same on server and device.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class ModelSpec(BaseModel):
    """Everything needed to rebuild a model: travels in manifests and configs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["logistic", "mlp2nn", "cnn"]
    input_shape: tuple[int, int, int]
    """(channels, height, width), e.g. (1, 8, 8) for digits, (1, 28, 28) for MNIST."""
    num_classes: int
    hidden: int = 200
    batch_norm: bool = False


class SplitModel(nn.Module):
    """A ``body`` (shared representation) followed by a ``head`` (classifier)."""

    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _logistic(spec: ModelSpec) -> SplitModel:
    c, h, w = spec.input_shape
    return SplitModel(nn.Flatten(), nn.Linear(c * h * w, spec.num_classes))


def _mlp2nn(spec: ModelSpec) -> SplitModel:
    c, h, w = spec.input_shape
    body = nn.Sequential(
        nn.Flatten(),
        nn.Linear(c * h * w, spec.hidden),
        nn.ReLU(),
        nn.Linear(spec.hidden, spec.hidden),
        nn.ReLU(),
    )
    return SplitModel(body, nn.Linear(spec.hidden, spec.num_classes))


def _cnn(spec: ModelSpec) -> SplitModel:
    """McMahan et al.'s CNN: 5x5 conv 32 -> pool -> 5x5 conv 64 -> pool -> FC 512.

    On 8x8 inputs the same layers are used with 'same' padding, so two 2x2 pools
    leave a 2x2 map (the 28x28 version leaves 7x7, as in the paper). With
    ``spec.batch_norm`` a BatchNorm2d follows each convolution inside ``body`` (keys
    like ``body.1.running_mean``): the layers FedBN keeps on the device. Without it
    the layers, names and parameter count are exactly McMahan et al.'s.
    """
    c, h, w = spec.input_shape

    def conv_block(c_in: int, c_out: int) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=5, padding=2)]
        if spec.batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        return [*layers, nn.ReLU(), nn.MaxPool2d(2)]

    body = nn.Sequential(
        *conv_block(c, 32),
        *conv_block(32, 64),
        nn.Flatten(),
        nn.Linear(64 * (h // 4) * (w // 4), 512),
        nn.ReLU(),
    )
    return SplitModel(body, nn.Linear(512, spec.num_classes))


_BUILDERS = {"logistic": _logistic, "mlp2nn": _mlp2nn, "cnn": _cnn}


def build_model(spec: ModelSpec, seed: int | None = None) -> SplitModel:
    """Build a model; with ``seed`` its initial weights are reproducible."""
    if seed is None:
        return _BUILDERS[spec.name](spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BUILDERS[spec.name](spec)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
