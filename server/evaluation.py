"""An evaluation round: the global model on the server's test set and on devices.

Every evaluated device measures the served global model, its personalized model
and a seeded few-step fine-tune of the global model on the same test examples;
held-out devices (never selected for training) measure the served model and the
fine-tune, i.e. what a brand-new user gets. Which training devices are evaluated
scales with the population (``evaluation.devices``): all of them for small
populations, a seeded sample for large ones, or this round's participants.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.config import ExperimentConfig
from common.protocol import RoundInstructions
from common.rows import DeviceIssue
from common.scoring import evaluate
from common.seeding import sample_devices
from common.weights import Arrays, load_arrays
from server.device_summary import DeviceRow, Role, device_row, device_summary, holdout_summary
from server.dispatch import Dispatcher, nbytes
from server.population import Population


@dataclass
class Evaluation:
    fields: dict[str, Any]
    """The evaluation's part of the round's metrics row."""
    rows: list[DeviceRow]


class Evaluator:
    def __init__(
        self,
        cfg: ExperimentConfig,
        population: Population,
        dispatcher: Dispatcher,
        task: Callable[[int, list[int]], RoundInstructions],
        model: torch.nn.Module,
        test: tuple[np.ndarray, np.ndarray],
    ) -> None:
        self.cfg = cfg
        self.population = population
        self.dispatcher = dispatcher
        self.task = task
        self.model = model
        self.x_test = torch.from_numpy(np.ascontiguousarray(test[0]))
        self.y_test = torch.from_numpy(np.ascontiguousarray(test[1])).long()
        self.mode = cfg.evaluation.mode(population.size)

    def due(self, round_: int) -> bool:
        return round_ % self.cfg.evaluation.every == 0 or round_ == self.cfg.rounds

    def _sample(self, round_: int, ids: np.ndarray, salt: int) -> list[int]:
        e = self.cfg.evaluation
        if ids.size <= e.sample_devices:
            return [int(i) for i in ids]
        return sample_devices(
            self.cfg.seed, round_ * 2 + salt, ids, 0.0, e.sample_devices, "eval-sample"
        )

    def targets(self, round_: int, trained: list[int]) -> list[tuple[int, Role]]:
        """(device, role) pairs to evaluate this round, in device-id order."""
        if self.mode == "participants":
            train = trained
        elif self.mode == "all":
            train = [int(i) for i in self.population.train_pool()]
        else:
            train = self._sample(round_, self.population.train_pool(), 0)
        held = self.population.holdout()
        held_ids = (
            self._sample(round_, held, 1) if self.mode == "sample" else [int(i) for i in held]
        )
        pairs: list[tuple[int, Role]] = [(d, "train") for d in train]
        pairs += [(d, "holdout") for d in held_ids]
        return sorted(pairs)

    def measure(
        self, round_: int, arrays: Arrays, devices: list[int]
    ) -> dict[int, tuple[float, float]]:
        """``arrays``' (accuracy, loss) on each device's test split, nothing else (no
        fine-tune): what a rollout compares. Devices that fail are left out."""
        quick = self.cfg.evaluation.model_copy(update={"finetune_steps": 0})
        got = self.dispatcher.exchange(
            "evaluate",
            round_,
            self.population.routes(devices),
            lambda ds: self.task(round_, ds).model_copy(update={"evaluation": quick}),
            arrays,
        )
        wanted = set(devices)
        return {r.device: (r.global_acc, r.global_loss) for r in got.evaluate if r.device in wanted}

    def run(self, round_: int, trained: list[int], global_arrays: Arrays) -> Evaluation:
        load_arrays(self.model, global_arrays)
        loss, acc = evaluate(self.model, self.x_test, self.y_test, self.cfg.evaluation.batch_size)
        fields: dict[str, Any] = {
            "evaluated": True,
            "global_test_acc": acc,
            "global_test_loss": loss,
            "eval_mode": self.mode,
        }
        targets = self.targets(round_, trained)
        if not targets:
            return Evaluation(fields, [])
        roles = dict(targets)
        devices = [d for d, _ in targets]
        got = self.dispatcher.exchange(
            "evaluate",
            round_,
            self.population.routes(devices),
            lambda ds: self.task(round_, ds),
            global_arrays,
        )
        rows = [device_row(roles[r.device], r) for r in got.evaluate if r.device in roles]
        fields["devices"] = device_summary([r for r in rows if r.role == "train"])
        if self.population.holdout().size:
            fields["holdout"] = holdout_summary([r for r in rows if r.role == "holdout"])
        problems: list[DeviceIssue] = sorted(got.failed + got.rejected, key=lambda f: f.device)
        fields["eval_failed"] = len(problems)
        if problems:
            fields["eval_failures"] = problems
        fields["eval_bytes_down"] = float(nbytes(global_arrays) * len(devices))
        return Evaluation(fields, rows)
