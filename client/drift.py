"""Apply the scenario's drift (``common.drift``) to a device's data, on the device."""

from __future__ import annotations

import json

from client.algorithms.loop import DeviceData
from common.drift import NUM_SHIFT, is_drifted
from common.protocol import RoundInstructions


def with_drift(data: DeviceData, task: RoundInstructions, device: int) -> DeviceData:
    """``data`` as the device sees it this round: labels permuted when it drifted."""
    spec = task.drift
    if spec is None or not is_drifted(spec, device):
        return data
    c = int(json.loads(task.model_spec)["num_classes"])
    return DeviceData(
        data.x_train,
        (data.y_train + NUM_SHIFT) % c,
        data.x_test,
        (data.y_test + NUM_SHIFT) % c,
    )
