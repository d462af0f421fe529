"""The server's round loop: select, dispatch, validate, aggregate, evaluate, record.

Why our own loop instead of ``strategy.start``: seeded selection in device-id order
(reproducible runs), a population that is not the set of Flower nodes (cohort
messages), validation of every update before it can touch the global model,
per-device personalized evaluation, and one typed metrics row per round that a
live reader can tail. Each step is a part with one job (``server.population``,
``selection``, ``dispatch``, ``validation``, ``aggregation``, ``evaluation``,
``recording``); ``run`` reads top to bottom.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from common.config import ExperimentConfig
from common.data import DeviceSource
from common.models import ModelSpec, build_model
from common.personalization import shared_keys
from common.protocol import RoundInstructions, task_for
from common.rows import ColdStart, DeviceIssue, Distribution, RoundCost, RoundRow, TimingRow
from common.seeding import derive_seed
from common.weights import Arrays, ArraySpec, model_to_arrays, spec_of, validate_update
from server.aggregation import Aggregator, partial_mean
from server.device_summary import DeviceRow, holdout_devices
from server.dispatch import Dispatcher, nbytes
from server.evaluation import Evaluator
from server.population import NodePopulation, PartitionPopulation, Population
from server.recording import Recorder
from server.selection import UniformSelection
from server.validation import Screened, screen

log = logging.getLogger("hybridfl.server")

PopulationKind = Literal["partition", "nodes"]
"""``partition`` (simulation: devices from the data, nodes are slots) or ``nodes``."""


class RunFailed(RuntimeError):
    """The run cannot go on (no devices, or too few usable updates in a round)."""


OnVersion = Callable[[int, Arrays, dict[str, float]], None]


class ServerLoop:
    """One federated run on a Flower ``Grid`` (simulation or deployment alike)."""

    def __init__(
        self,
        grid: object,
        cfg: ExperimentConfig,
        run_dir: Path,
        source: DeviceSource,
        on_version: OnVersion | None = None,
        population: PopulationKind = "partition",
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.on_version = on_version
        self.spec = ModelSpec(
            name=cfg.model.name,
            input_shape=source.input_shape,
            num_classes=source.num_classes,
            hidden=cfg.model.hidden,
            batch_norm=cfg.model.batch_norm,
        )
        self.model = build_model(self.spec, seed=derive_seed(cfg.seed, "init"))
        self.global_arrays: Arrays = model_to_arrays(self.model)
        self.expected: dict[str, ArraySpec] = spec_of(self.global_arrays)
        self.shared = shared_keys(cfg.client.algorithm, self.global_arrays)
        self.simulated = population == "partition"
        held = holdout_devices(cfg)
        sim = cfg.simulation
        if self.simulated:
            self.population: Population = PartitionPopulation(
                source.train_sizes(),
                held,
                grid,
                sim.devices_per_message,  # type: ignore[arg-type]
            )
        else:
            self.population = NodePopulation(
                grid,  # type: ignore[arg-type]
                cfg.partition.num_devices,
                held,
                self.task(0, []),
                min(120.0, cfg.strategy.round_timeout_s),
            )
        in_flight = sim.max_in_flight or sim.num_slots(os.cpu_count() or 1)
        if not self.simulated:
            in_flight = max(in_flight, cfg.partition.num_devices)  # one message per device
        self.dispatcher = Dispatcher(grid, cfg.strategy.round_timeout_s, in_flight)
        s = cfg.strategy
        self.selection = UniformSelection(
            cfg.seed, s.fraction_train, s.min_train_devices, s.devices_per_round
        )
        self.aggregator = Aggregator(cfg)
        self.evaluator = Evaluator(
            cfg, self.population, self.dispatcher, self.task, self.model, source.server_test()
        )
        self.recorder = Recorder(run_dir)
        self.last_device_rows: list[DeviceRow] = []

    @property
    def last_metrics(self) -> dict[str, object]:
        last = self.recorder.last
        return {} if last is None else last.model_dump(exclude_none=True)

    def task(self, round_: int, devices: list[int]) -> RoundInstructions:
        return task_for(
            self.cfg,
            round_,
            self.spec.model_dump_json(),
            str(self.run_dir),
            devices if self.simulated else [],
            durable_state=not self.simulated,
            preaggregate=self.cfg.simulation.preaggregate and self.simulated,
        )

    # -- the run -----------------------------------------------------------------
    def run(self) -> Arrays:
        self.recorder.start()
        self.population.connect()
        pool = self.population.train_pool()
        if pool.size == 0:
            raise RunFailed(
                f"no device may train: all {self.population.size} are held out "
                "(lower evaluation.holdout_fraction)"
            )
        if self.on_version:
            self.on_version(0, self.global_arrays, {})
        t_start = time.perf_counter()
        for rnd in range(1, self.cfg.rounds + 1):
            t0 = time.perf_counter()
            self.population.refresh()
            chosen = self.selection.select(rnd, self.population.train_pool())
            row, trained, device_s = self.train_round(rnd, chosen)
            t_train = time.perf_counter() - t0
            if self.evaluator.due(rnd):
                ev = self.evaluator.run(rnd, trained, self.global_arrays)
                row = row.model_copy(update=ev.fields)
                if ev.rows:
                    self.last_device_rows = ev.rows
                    self.recorder.devices(rnd, ev.rows)
            if self.on_version:
                flat = {
                    k: float(v)
                    for k, v in row.model_dump(exclude_none=True).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
                self.on_version(rnd, self.global_arrays, flat)
            now = time.perf_counter()
            timing = TimingRow(
                round=rnd,
                train_s=t_train,
                round_s=now - t0,
                elapsed_s=now - t_start,
                device_train_s=Distribution.of(device_s) if device_s else None,
            )
            self.recorder.round(row, timing)
        return self.global_arrays

    def train_round(
        self, round_: int, chosen: list[int]
    ) -> tuple[RoundRow, list[int], list[float]]:
        """Dispatch, screen, aggregate; the round's row (without evaluation), the devices
        whose update was used, and their wall-clock training seconds."""
        shared_now = {k: self.global_arrays[k] for k in sorted(self.shared)}
        self.aggregator.configure(round_, shared_now)
        got = self.dispatcher.exchange(
            "train",
            round_,
            self.population.routes(chosen),
            lambda ds: self.task(round_, ds),
            self.global_arrays,
        )
        ok = screen(got, self.expected, self.shared, self.population.num_examples)
        self._require_enough(round_, chosen, ok, got.failed)
        self.global_arrays.update(self._aggregate(round_, ok))
        reports = ok.reports()
        weights = [float(self.population.num_examples(r.device)) for r in reports]
        shared_bytes = float(nbytes(shared_now))
        loss = float(np.average([r.train_loss for r in reports], weights=weights))
        cold = [
            ColdStart(device=r.device, acc=r.cold_start_acc, version=r.cold_start_version)
            for r in reports
            if r.cold_start_acc is not None
        ]
        if cold:
            self.recorder.cold_starts(round_, cold)
        row = RoundRow(
            round=round_,
            num_sampled=len(chosen),
            num_updates=len(reports),
            num_failed=len(got.failed),
            num_rejected=len(ok.rejected),
            failed=got.failed,
            rejected=ok.rejected,
            train_loss=loss if math.isfinite(loss) else None,
            num_clipped=self.aggregator.clipped if self.cfg.strategy.clip_norm > 0 else None,
            bytes_up=shared_bytes * len(reports),
            bytes_down=float(nbytes(self.global_arrays)) * len(chosen),
            cost=RoundCost(
                steps=Distribution.of([float(r.steps) for r in reports]),
                bytes_up=Distribution.of([shared_bytes] * len(reports)),
                bytes_down=float(nbytes(self.global_arrays)),
            ),
            cold_start=cold or None,
            state_resets=[
                DeviceIssue(device=r.device, reason=r.state_reset)
                for r in reports
                if r.state_reset is not None
            ]
            or None,
        )
        return row, [r.device for r in reports], [r.train_time_s for r in reports]

    def _require_enough(
        self, round_: int, chosen: list[int], ok: Screened, failed: list[DeviceIssue]
    ) -> None:
        n, s = len(ok.devices), self.cfg.strategy
        reasons = " | ".join(f"device {f.device}: {f.reason}" for f in (failed + ok.rejected)[:3])
        if n < s.min_train_devices:
            raise RunFailed(
                f"round {round_}: {n} usable updates, fewer than strategy.min_train_devices="
                f"{s.min_train_devices}. {reasons}"
            )
        if len(failed) > s.max_failed_fraction * len(chosen):
            raise RunFailed(
                f"round {round_}: {len(failed)} of {len(chosen)} selected devices failed, more "
                f"than strategy.max_failed_fraction={s.max_failed_fraction:g} (raise it to "
                f"accept this). {reasons}"
            )

    def _aggregate(self, round_: int, ok: Screened) -> Arrays:
        updates = [
            (float(self.population.num_examples(r.report.device)), r.arrays) for r in ok.accepted
        ]
        updates += [(p.weight_total, partial_mean(p.sums, p.weight_total)) for p in ok.partials]
        updates = [u for u in updates if u[1]]
        new = self.aggregator.aggregate(round_, updates)
        # Server optimisers (FedAdam) and partial sums compute in float64: cast back.
        new = {k: v.astype(self.expected[k].dtype) for k, v in new.items() if k in self.expected}
        bad = validate_update(new, self.expected, required=self.shared)
        if bad is not None:
            raise RunFailed(f"round {round_}: aggregated model is invalid ({bad})")
        return new
