"""Loss and accuracy of a model on in-memory tensors (server and device alike)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """Return (mean cross-entropy, accuracy) of ``model`` on (x, y)."""
    model.eval()
    n = x.shape[0]
    if n == 0:
        return 0.0, 0.0
    loss_sum, correct = 0.0, 0
    for start in range(0, n, batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return loss_sum / n, correct / n
