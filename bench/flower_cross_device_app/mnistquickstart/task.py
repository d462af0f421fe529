"""mnistquickstart: model, data and training code (quickstart-pytorch's ``task.py``).

Mirrors ``examples/quickstart-pytorch`` on purpose: the data is loaded once per
process into module-level caches; the device's tensors and a ``DataLoader`` are made
per call. The data of device ``partition-id`` is exactly what hybridfl gives the same
device: MNIST as hybridfl's npz loader prepares it, sliced by the partition file the
benchmark wrote with hybridfl's own partitioner. The model is McMahan et al.'s 2NN
from ``common.models``, so every variant trains the same network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.data.dataset import Dataset
from common.data.loaders import load_npz
from common.data.partition import Partition, device_arrays, load_partition
from common.models import ModelSpec, build_model


def load_model() -> nn.Module:
    """McMahan et al.'s 2NN (two hidden layers of 200 ReLU units) for MNIST."""
    return build_model(ModelSpec(name="mlp2nn", input_shape=(1, 28, 28), num_classes=10))


_cache: tuple[Dataset, Partition] | None = None  # Cache the loaded data and partition


def load_data(
    partition_id: int, batch_size: int, data_path: str, partition_path: str
) -> DataLoader:
    """One device's training split as a shuffled DataLoader."""
    global _cache
    if _cache is None:
        _cache = (load_npz(Path(data_path)), load_partition(Path(partition_path)))
    dataset, partition = _cache
    x, y, _, _ = device_arrays(dataset, partition, partition_id)
    trainset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long())
    return DataLoader(trainset, batch_size=batch_size, shuffle=True)


def train(net: nn.Module, trainloader: DataLoader, epochs: int, lr: float) -> float:
    """Train the model on the training set (plain SGD, as every benchmark variant)."""
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * max(1, len(trainloader)))
