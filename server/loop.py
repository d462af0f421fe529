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

import gc
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from common.config import ExperimentConfig
from common.crashpoint import crash_point
from common.data import DeviceSource
from common.models import ModelSpec, build_model
from common.personalization import shared_keys
from common.protocol import RoundInstructions, task_for
from common.rows import ColdStart, DeviceIssue, Distribution, RoundCost, RoundRow, TimingRow
from common.rundir import PROFILES_FILE
from common.seeding import derive_seed
from common.weights import Arrays, ArraySpec, model_to_arrays, spec_of, validate_update
from server.aggregation import Aggregator, partial_mean
from server.availability import availability_for
from server.checkpoint import save_checkpoint, start
from server.clock import ClockError, DeviceClock, SyncClock, SyncPlan
from server.device_summary import DeviceRow, holdout_devices
from server.dispatch import Dispatcher, nbytes
from server.evaluation import Evaluator
from server.fedbuff import BufferedRun
from server.population import NodePopulation, PartitionPopulation, Population
from server.profiles import ProfileFileError, profiles_for, write_profiles
from server.recording import Recorder
from server.rollout import rollout_for
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
        resume: bool = False,
    ) -> None:
        self.cfg = cfg
        self.resume = resume
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
        self.rollout = rollout_for(cfg, run_dir, self.evaluator.measure, self.population)
        self.last_device_rows: list[DeviceRow] = []
        self.clock = self._device_clock() if cfg.clock.enabled else None
        self.sync = (
            SyncClock(self.clock, self.selection.size)
            if self.clock is not None and cfg.clock.mode == "sync"
            else None
        )

    def _device_clock(self) -> DeviceClock:
        """Profiles (sampled or the user's file, written to the run folder) + availability."""
        if not self.simulated:
            raise RunFailed(
                "clock.mode simulates devices' time; a deployment runs on the wall clock: "
                "set clock.mode = 'off' for hybridfl deploy"
            )
        c = self.cfg.clock
        try:
            profiles = profiles_for(c, self.cfg.seed, self.population.size)
            clock = DeviceClock(
                self.cfg,
                profiles,
                availability_for(c, self.cfg.seed, profiles),
                self.population.num_examples,
            )
            clock.check_deadline(float(nbytes(self.global_arrays)))
        except (ProfileFileError, ClockError, ValueError) as err:
            raise RunFailed(str(err)) from None
        write_profiles(profiles, self.run_dir / PROFILES_FILE)
        return clock

    @property
    def last_metrics(self) -> dict[str, object]:
        last = self.recorder.last
        return {} if last is None else last.model_dump(exclude_none=True)

    def task(
        self, round_: int, devices: list[int], limits: dict[int, int] | None = None
    ) -> RoundInstructions:
        return task_for(
            self.cfg,
            round_,
            self.spec.model_dump_json(),
            str(self.run_dir),
            devices if self.simulated else [],
            durable_state=not self.simulated,
            preaggregate=self.cfg.simulation.preaggregate and self.simulated,
            step_limits={d: limits[d] for d in devices if d in limits} if limits else None,
        )

    # -- the run -----------------------------------------------------------------
    def run(self) -> Arrays:
        first = start(self, self.resume)
        self.population.connect()
        pool = self.population.train_pool()
        if pool.size == 0:
            raise RunFailed(
                f"no device may train: all {self.population.size} are held out "
                "(lower evaluation.holdout_fraction)"
            )
        if first == 1:
            if self.on_version:
                self.on_version(0, self.global_arrays, {})
            save_checkpoint(self, 0)
        # Flower's ArrayRecord.from_numpy_ndarrays(keep_input=False) runs a full
        # gc.collect() per call (Bulyan: one per selected update); everything built so
        # far (model, data, imports) lives for the whole run, so take it out of the
        # collector's scans: each collection then costs what the round allocated.
        gc.freeze()
        t_start = time.perf_counter()
        if self.cfg.clock.mode == "async":
            assert self.clock is not None
            BufferedRun(self, self.clock).run(t_start)
            return self.global_arrays
        for rnd in range(first, self.cfg.rounds + 1):
            t0 = time.perf_counter()
            self.population.refresh()
            plan = self._plan(rnd) if self.sync is not None else None
            if plan is None:
                chosen = self.selection.select(rnd, self.population.train_pool())
                row, trained, device_s = self.train_round(rnd, chosen)
            else:
                row, trained, device_s = self.train_round(rnd, plan.kept, plan.step_limits)
                row = row.model_copy(update={"clock": plan.row()})
            self.finish_round(rnd, row, trained, device_s, t0, t_start)
            save_checkpoint(self, rnd)
        return self.global_arrays

    def finish_round(
        self,
        rnd: int,
        row: RoundRow,
        trained: list[int],
        device_s: list[float],
        t0: float,
        t_start: float,
    ) -> None:
        """Evaluate when due, publish the version, record the round's rows."""
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
        if self.rollout is not None:
            row = self.rollout.after_round(rnd, row, [r.device for r in self.last_device_rows])
        now = time.perf_counter()
        timing = TimingRow(
            round=rnd,
            train_s=t_train,
            round_s=now - t0,
            elapsed_s=now - t_start,
            device_train_s=Distribution.of(device_s) if device_s else None,
        )
        self.recorder.round(row, timing)

    def _plan(self, round_: int) -> SyncPlan:
        """The clock decides who trains (and who is dropped) before any training."""
        assert self.sync is not None
        shared_bytes = float(nbytes({k: self.global_arrays[k] for k in self.shared}))
        try:
            plan = self.sync.plan(
                round_,
                self.population.train_pool(),
                float(nbytes(self.global_arrays)),
                shared_bytes,
            )
        except ClockError as err:
            raise RunFailed(f"round {round_}: {err}") from None
        if len(plan.kept) < self.cfg.strategy.min_train_devices:
            why = " | ".join(f"device {d.device}: {d.reason}" for d in plan.dropped[:3])
            raise RunFailed(
                f"round {round_}: {len(plan.kept)} of {len(plan.selected)} selected devices "
                f"could finish on the virtual clock, fewer than strategy.min_train_devices="
                f"{self.cfg.strategy.min_train_devices} (raise clock.deadline_s or "
                f"clock.overcommit, or loosen availability). {why}"
            )
        return plan

    def train_round(
        self, round_: int, chosen: list[int], limits: dict[int, int] | None = None
    ) -> tuple[RoundRow, list[int], list[float]]:
        """Dispatch, screen, aggregate; the round's row (without evaluation), the devices
        whose update was used, and their wall-clock training seconds."""
        shared_now = {k: self.global_arrays[k] for k in sorted(self.shared)}
        self.aggregator.configure(round_, shared_now)
        got = self.dispatcher.exchange(
            "train",
            round_,
            self.population.routes(chosen),
            lambda ds: self.task(round_, ds, limits),
            self.global_arrays,
        )
        crash_point("round-trained", round_)
        ok = screen(got, self.expected, self.shared, self.population.num_examples)
        self.require_enough(round_, chosen, ok, got.failed)
        self.global_arrays.update(self.aggregate(round_, self.updates(ok)))
        return self.round_row(round_, chosen, ok, got.failed, shared_now)

    def round_row(
        self,
        round_: int,
        chosen: list[int],
        ok: Screened,
        failed: list[DeviceIssue],
        shared_now: Arrays,
    ) -> tuple[RoundRow, list[int], list[float]]:
        """The round's row (without evaluation), the devices whose update was used, and
        their wall-clock training seconds."""
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
            num_failed=len(failed),
            num_rejected=len(ok.rejected),
            failed=failed,
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

    def require_enough(
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

    def updates(self, ok: Screened) -> list[tuple[float, Arrays]]:
        """(weight the server knows, arrays) of every accepted update or partial sum."""
        updates = [
            (float(self.population.num_examples(r.report.device)), r.arrays) for r in ok.accepted
        ]
        updates += [(p.weight_total, partial_mean(p.sums, p.weight_total)) for p in ok.partials]
        return [u for u in updates if u[1]]

    def aggregate(self, round_: int, updates: list[tuple[float, Arrays]]) -> Arrays:
        new = self.aggregator.aggregate(round_, updates)
        # Server optimisers (FedAdam) and partial sums compute in float64: cast back.
        new = {k: v.astype(self.expected[k].dtype) for k, v in new.items() if k in self.expected}
        bad = validate_update(new, self.expected, required=self.shared)
        if bad is not None:
            raise RunFailed(f"round {round_}: aggregated model is invalid ({bad})")
        return new
