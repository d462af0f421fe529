"""mnistquickstart: the ServerApp (quickstart-pytorch's ``server_app.py``).

Flower's ``FedAvg`` run by ``strategy.start``, as in the example, sampling
``fraction-train`` of the SuperNodes (one per device) each round. The one addition
is for the benchmark: each round's wall-clock start (``configure_train``) and end
(``aggregate_train`` done) go to a JSON-lines file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from mnistquickstart.task import load_model


class TimedFedAvg(FedAvg):
    """FedAvg that records when each training round starts and ends."""

    def __init__(self, rounds_file: Path, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.rounds_file = rounds_file
        self._start: dict[int, float] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._start[server_round] = time.time()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        row = {
            "round": server_round,
            "start": self._start.get(server_round),
            "end": time.time(),
            "replies": len(replies),
            "errors": sum(m.has_error() for m in replies),
            "torch_threads": float(metrics["torch-threads"]) if metrics else None,
        }
        with self.rounds_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return arrays, metrics


# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    num_devices = int(context.run_config["num-devices"])
    strategy = TimedFedAvg(
        Path(str(context.run_config["rounds-file"])),
        fraction_train=float(context.run_config["fraction-train"]),
        fraction_evaluate=0.0,
        min_train_nodes=int(context.run_config["min-train-nodes"]),
        min_available_nodes=num_devices,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(load_model().state_dict()),
        train_config=ConfigRecord({"lr": float(context.run_config["learning-rate"])}),
        num_rounds=int(context.run_config["num-server-rounds"]),
    )
