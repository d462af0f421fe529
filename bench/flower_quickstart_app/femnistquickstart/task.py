"""femnistquickstart: model, data and training code (quickstart-pytorch's ``task.py``).

Why it looks like this: it is the "Flower quickstart style" baseline of
``bench/round_overhead.py``, so it mirrors ``examples/quickstart-pytorch`` on
purpose. The data file is loaded once per process into a module-level cache (as the
example caches its ``FederatedDataset``); the device's partition, the tensors and a
``DataLoader`` are made per call, as the example's ``load_data`` does. The model is
McMahan et al.'s CNN from ``common.models`` so that every variant of the benchmark
trains exactly the same network.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.models import ModelSpec, build_model

NUM_CLASSES = 62
KEYS = ("x_train", "y_train", "writer_train", "x_test", "y_test", "writer_test")


def load_model() -> nn.Module:
    """McMahan et al.'s CNN for 28x28 grey images and FEMNIST's 62 classes."""
    return build_model(ModelSpec(name="cnn", input_shape=(1, 28, 28), num_classes=NUM_CLASSES))


fds: dict[str, np.ndarray] | None = None  # Cache the loaded data file


def _images(x: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1], what ``ToTensor`` gives."""
    return torch.from_numpy(x).float().div_(255.0).unsqueeze(1)


def load_data(
    partition_id: int, num_partitions: int, batch_size: int, data_path: str
) -> tuple[DataLoader, DataLoader]:
    """Load one writer's FEMNIST data: natural split, one device per writer."""
    # Only load the data file once per process
    global fds
    if fds is None:
        with np.load(data_path, allow_pickle=False) as npz:
            fds = {k: npz[k] for k in KEYS}
    writers = np.unique(fds["writer_train"])
    if num_partitions > len(writers):
        raise ValueError(f"{num_partitions} partitions but the data has {len(writers)} writers")
    writer = writers[partition_id]
    tr = fds["writer_train"] == writer
    te = fds["writer_test"] == writer
    trainset = TensorDataset(
        _images(fds["x_train"][tr]), torch.from_numpy(fds["y_train"][tr].astype(np.int64))
    )
    testset = TensorDataset(
        _images(fds["x_test"][te]), torch.from_numpy(fds["y_test"][te].astype(np.int64))
    )
    trainloader = DataLoader(trainset, batch_size=batch_size, shuffle=True)
    testloader = DataLoader(testset, batch_size=batch_size)
    return trainloader, testloader


def train(
    net: nn.Module, trainloader: DataLoader, epochs: int, lr: float, device: torch.device
) -> float:
    """Train the model on the training set (plain SGD, as every benchmark variant)."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net: nn.Module, testloader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Validate the model on the test set: (mean loss, accuracy)."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    net.eval()
    with torch.no_grad():
        for images, labels in testloader:
            images, labels = images.to(device), labels.to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (outputs.argmax(1) == labels).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)
