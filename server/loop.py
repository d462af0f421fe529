"""The server's round loop: sample, send, validate, aggregate, evaluate, record.

Why our own loop instead of ``strategy.start``: we need seeded device sampling in
device-id order (reproducible runs), validation of every update before it can
touch the global model, per-device personalized evaluation, and one metrics line
per round that a live reader (the CLI, the HTTP server) can tail.

Evaluation protocol (``evaluate``): every evaluated device measures the served global
model, its personalized model and a seeded few-step fine-tune of the global model on
the same test examples; held-out devices (never sampled for training) measure the
global model and the fine-tune, i.e. what a brand-new user gets. Results are
summarised per role and written per device to ``devices.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common.config import ExperimentConfig
from common.data import Dataset
from common.evaluation import evaluate
from common.models import ModelSpec, build_model, count_parameters
from common.personalization import shared_keys
from common.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, RoundInstructions
from common.records import from_record, to_record
from common.rundir import METRICS_FILE, TIMINGS_FILE, append_jsonl
from common.seeding import derive_seed, sample_devices
from common.weights import Arrays, ArraySpec, load_arrays, model_to_arrays, spec_of, validate_update
from server.evaluation import (
    DEVICES_FILE,
    DeviceRow,
    Role,
    device_row,
    device_summary,
    holdout_devices,
    holdout_summary,
    write_device_rows,
)
from server.strategies import make_strategy, prepare_round

log = logging.getLogger("hybridfl.server")


class RunFailed(RuntimeError):
    """The run cannot go on (no devices, or too few usable replies in a round)."""


@dataclass
class RoundOutcome:
    """What came back from the devices in one round."""

    valid: list[tuple[int, Message]] = field(default_factory=list)
    failed: list[dict[str, object]] = field(default_factory=list)
    rejected: list[dict[str, object]] = field(default_factory=list)
    cold_start: list[dict[str, object]] = field(default_factory=list)
    """First-join devices: the served model's accuracy on their own test split."""


COLD_START_FILE = "cold_start.jsonl"


def _nbytes(arrays: Iterable[np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays))


class ServerLoop:
    """One federated run on a Flower ``Grid`` (simulation or deployment alike)."""

    def __init__(
        self,
        grid: Grid,
        cfg: ExperimentConfig,
        run_dir: Path,
        dataset: Dataset,
        on_version: Callable[[int, Arrays, dict[str, float]], None] | None = None,
    ) -> None:
        self.grid = grid
        self.cfg = cfg
        self.run_dir = run_dir
        self.on_version = on_version
        self.spec = ModelSpec(
            name=cfg.model.name,
            input_shape=dataset.input_shape,
            num_classes=dataset.num_classes,
            hidden=cfg.model.hidden,
            batch_norm=cfg.model.batch_norm,
        )
        self.model = build_model(self.spec, seed=derive_seed(cfg.seed, "init"))
        self.global_arrays: Arrays = model_to_arrays(self.model)
        self.expected: dict[str, ArraySpec] = spec_of(self.global_arrays)
        self.shared = shared_keys(cfg.client.algorithm, self.global_arrays)
        self.strategy = make_strategy(cfg.strategy)
        self.x_test = torch.from_numpy(np.ascontiguousarray(dataset.x_test))
        self.y_test = torch.from_numpy(np.ascontiguousarray(dataset.y_test)).long()
        self.devices: dict[int, int] = {}  # device id -> node id
        self.node_to_device: dict[int, int] = {}
        self.sent_to: dict[str, int] = {}
        """Message id -> device of the last send: errors the SuperLink itself makes
        (node unavailable) come from node 0, so only ``reply_to`` names the device."""
        self.last_metrics: dict[str, object] = {}
        self.holdout: frozenset[int] = frozenset(holdout_devices(cfg))
        """Devices that never train: they stand in for users the federation never saw."""
        self.last_device_rows: list[DeviceRow] = []

    # -- setup -------------------------------------------------------------------
    def instructions(self, round_: int) -> RoundInstructions:
        c = self.cfg.client
        return RoundInstructions(
            round=round_,
            seed=self.cfg.seed,
            algorithm=c.algorithm,
            model_spec=self.spec.model_dump_json(),
            local_epochs=c.local_epochs,
            batch_size=c.batch_size,
            lr=c.lr,
            momentum=c.momentum,
            weight_decay=c.weight_decay,
            proximal_mu=c.proximal_mu if c.algorithm == "fedprox" else 0.0,
            head_epochs=c.head_epochs,
            ditto_lambda=c.ditto_lambda,
            apfl_alpha=c.apfl_alpha,
            apfl_alpha_lr=c.apfl_alpha_lr,
            eval_batch_size=self.cfg.evaluation.batch_size,
            finetune_steps=self.cfg.evaluation.finetune_steps,
            finetune_lr=self.cfg.evaluation.finetune_lr,
            torch_threads=self.cfg.simulation.torch_threads,
            run_dir=str(self.run_dir),
        )

    def register_devices(self, wait_s: float = 120.0) -> None:
        """Ask every connected node which device it is (a 'hello' query)."""
        want = self.cfg.partition.num_devices
        deadline = time.monotonic() + wait_s
        node_ids = sorted(self.grid.get_node_ids())
        while len(node_ids) < want and time.monotonic() < deadline:
            time.sleep(0.5)
            node_ids = sorted(self.grid.get_node_ids())
        if not node_ids:
            raise RunFailed("no device connected to the SuperLink")
        cfg_rec = ConfigRecord(self.instructions(0).to_flat())
        msgs = [
            Message(RecordDict({CONFIG_KEY: cfg_rec}), dst_node_id=n, message_type="query.hello")
            for n in node_ids
        ]
        replies = list(self.grid.send_and_receive(msgs, timeout=wait_s))
        errors = []
        for r in replies:
            if r.has_error():
                errors.append(f"node {r.metadata.src_node_id}: {r.error.reason}")
                continue
            dev = int(r.content[METRICS_KEY]["device-id"])
            self.devices[dev] = r.metadata.src_node_id
            self.node_to_device[r.metadata.src_node_id] = dev
        if not self.devices:
            raise RunFailed("no device could start: " + "; ".join(errors[:3]))
        for e in errors:
            log.warning("device registration failed: %s", e)
        log.info("registered %d devices", len(self.devices))

    def refresh_devices(self) -> None:
        """Ask nodes we have not met which device they are (deployment only).

        A restarted SuperNode may come back under a new node id; without this its
        device would stay mapped to the dead node. Simulation nodes never change, so
        this sends nothing there.
        """
        unknown = sorted(set(self.grid.get_node_ids()) - set(self.node_to_device))
        if not unknown:
            return
        cfg_rec = ConfigRecord(self.instructions(0).to_flat())
        msgs = [
            Message(RecordDict({CONFIG_KEY: cfg_rec}), dst_node_id=n, message_type="query.hello")
            for n in unknown
        ]
        timeout = min(120.0, self.cfg.strategy.round_timeout_s)
        for r in self.grid.send_and_receive(msgs, timeout=timeout):
            if r.has_error():
                continue
            dev, node = int(r.content[METRICS_KEY]["device-id"]), r.metadata.src_node_id
            old = self.devices.get(dev)
            if old is not None and old != node:
                self.node_to_device.pop(old, None)
            self.devices[dev] = node
            self.node_to_device[node] = dev
            log.info("device %d is now node %d", dev, node)

    # -- one round ---------------------------------------------------------------
    def _send(self, round_: int, kind: str, device_ids: list[int]) -> list[Message]:
        instr = self.instructions(round_)
        flat = instr.to_flat()
        if kind == "train":
            flat.update(
                prepare_round(self.strategy, {k: self.global_arrays[k] for k in self.shared})
            )
        record = to_record(self.global_arrays)
        msgs = [
            Message(
                RecordDict({ARRAYS_KEY: record, CONFIG_KEY: ConfigRecord(flat)}),
                dst_node_id=self.devices[d],
                message_type=kind,
                group_id=str(round_),
            )
            for d in device_ids
        ]
        replies = list(self.grid.send_and_receive(msgs, timeout=self.cfg.strategy.round_timeout_s))
        self.sent_to = {m.metadata.message_id: d for m, d in zip(msgs, device_ids, strict=True)}
        return replies

    def _check(self, replies: list[Message], chosen: list[int], train: bool) -> RoundOutcome:
        out = RoundOutcome()
        seen: set[int] = set()
        for r in replies:
            dev = self.node_to_device.get(
                r.metadata.src_node_id, self.sent_to.get(r.metadata.reply_to_message_id, -1)
            )
            seen.add(dev)
            if r.has_error():
                out.failed.append({"device": dev, "reason": r.error.reason})
                log.warning("device %d failed: %s", dev, r.error.reason)
                continue
            reason = None
            if train:
                if ARRAYS_KEY not in r.content.array_records:
                    reason = "reply has no arrays"
                else:
                    arrays = from_record(r.content[ARRAYS_KEY])
                    reason = validate_update(arrays, self.expected, required=self.shared)
                    if reason is None and set(arrays) != self.shared:
                        extra = sorted(set(arrays) - self.shared)[:3]
                        reason = f"sent {extra}, which must stay personal"
            metrics = r.content.metric_records.get(METRICS_KEY)
            if reason is None and (metrics is None or float(metrics.get("num-examples", 0)) <= 0):
                reason = "metrics lack a positive num-examples"
            if reason is not None:
                out.rejected.append({"device": dev, "reason": reason})
                log.warning("rejected update of device %d: %s", dev, reason)
                continue
            out.valid.append((dev, r))
        for d in chosen:
            if d not in seen:
                out.failed.append({"device": d, "reason": "no reply before the round timeout"})
        out.valid.sort(key=lambda t: t[0])
        out.failed.sort(key=lambda f: int(f["device"]))  # type: ignore[call-overload]
        return out

    def train_round(self, round_: int, chosen: list[int]) -> tuple[RoundOutcome, dict[str, float]]:
        replies = self._send(round_, "train", chosen)
        outcome = self._check(replies, chosen, train=True)
        for dev, m in outcome.valid:
            acc = m.content[METRICS_KEY].get("cold-start-acc")
            if acc is not None:
                outcome.cold_start.append({"device": dev, "acc": float(acc)})
        if len(outcome.valid) < self.cfg.strategy.min_train_devices:
            reasons = [
                f"device {f['device']}: {f['reason']}" for f in outcome.failed + outcome.rejected
            ]
            raise RunFailed(
                f"round {round_}: {len(outcome.valid)} usable updates, fewer than "
                f"strategy.min_train_devices={self.cfg.strategy.min_train_devices}. "
                + " | ".join(reasons[:3])
            )
        agg_arrays, agg_metrics = self.strategy.aggregate_train(
            round_, [m for _, m in outcome.valid]
        )
        if agg_arrays is None:
            raise RunFailed(f"round {round_}: the strategy produced no aggregate")
        # Server optimisers (FedAdam) compute in float64: cast back before checking.
        new = {
            k: v.astype(self.expected[k].dtype) if k in self.expected else v
            for k, v in from_record(agg_arrays).items()
        }
        bad = validate_update(new, self.expected, required=self.shared)
        if bad is not None:
            raise RunFailed(f"round {round_}: aggregated model is invalid ({bad})")
        self.global_arrays.update(new)
        up = sum(_nbytes(from_record(m.content[ARRAYS_KEY]).values()) for _, m in outcome.valid)
        stats = {
            "train_loss": float(agg_metrics.get("train-loss", float("nan")))
            if agg_metrics
            else float("nan"),
            "bytes_up": float(up),
            "bytes_down": float(_nbytes(self.global_arrays.values()) * len(chosen)),
        }
        return outcome, stats

    def run(self) -> Arrays:
        cfg = self.cfg
        metrics_path = self.run_dir / METRICS_FILE
        timings_path = self.run_dir / TIMINGS_FILE
        metrics_path.unlink(missing_ok=True)
        timings_path.unlink(missing_ok=True)
        (self.run_dir / COLD_START_FILE).unlink(missing_ok=True)
        (self.run_dir / DEVICES_FILE).unlink(missing_ok=True)
        self.register_devices()
        if self.on_version:
            self.on_version(0, self.global_arrays, {})
        device_ids = self.train_pool()
        t_start = time.perf_counter()
        for rnd in range(1, cfg.rounds + 1):
            t0 = time.perf_counter()
            self.refresh_devices()
            chosen = sample_devices(
                cfg.seed,
                rnd,
                device_ids,
                cfg.strategy.fraction_train,
                cfg.strategy.min_train_devices,
            )
            outcome, stats = self.train_round(rnd, chosen)
            t_train = time.perf_counter() - t0
            row: dict[str, object] = {
                "round": rnd,
                "num_sampled": len(chosen),
                "num_updates": len(outcome.valid),
                "num_failed": len(outcome.failed),
                "num_rejected": len(outcome.rejected),
                "failed": outcome.failed,
                "rejected": outcome.rejected,
                **stats,
            }
            if outcome.cold_start:
                row["cold_start"] = outcome.cold_start
                append_jsonl(
                    self.run_dir / COLD_START_FILE, {"round": rnd, "devices": outcome.cold_start}
                )
            if rnd % cfg.evaluation.every == 0 or rnd == cfg.rounds:
                row.update(self.evaluate(rnd, [d for d, _ in outcome.valid]))
            self.last_metrics = row
            if self.on_version:
                flat = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
                self.on_version(rnd, self.global_arrays, flat)
            append_jsonl(metrics_path, row)
            append_jsonl(
                timings_path,
                {
                    "round": rnd,
                    "train_s": t_train,
                    "round_s": time.perf_counter() - t0,
                    "elapsed_s": time.perf_counter() - t_start,
                },
            )
        return self.global_arrays

    def train_pool(self) -> list[int]:
        """Registered devices that may be sampled for training (held-out ones never are)."""
        pool = sorted(d for d in self.devices if d not in self.holdout)
        if not pool:
            raise RunFailed(
                f"no registered device may train: all {len(self.devices)} are held out "
                "(lower evaluation.holdout_fraction)"
            )
        return pool

    def eval_targets(self, trained: list[int]) -> list[tuple[int, Role]]:
        """(device, role) pairs to evaluate this round, in device-id order.

        Training devices per ``evaluation.devices`` (this round's participants, or all
        of them); held-out devices always, so their curve has a point at every evaluation.
        """
        if self.cfg.evaluation.devices == "all":
            train = [d for d in self.devices if d not in self.holdout]
        else:
            train = [d for d in trained if d not in self.holdout]
        held = [d for d in self.devices if d in self.holdout]
        pairs: list[tuple[int, Role]] = [(d, "train") for d in train]
        pairs += [(d, "holdout") for d in held]
        return sorted(pairs)

    def evaluate(self, round_: int, trained: list[int]) -> dict[str, object]:
        """Evaluate the global model on the server's test set and on the devices.

        Each device reports global, personalized and fine-tuned accuracy on its own
        test split (see ``client.evaluation``); training and held-out devices are
        summarised apart, and ``devices.jsonl`` is replaced with this evaluation's
        per-device rows. Nothing here depends on reply order or timing.
        """
        load_arrays(self.model, self.global_arrays)
        loss, acc = evaluate(self.model, self.x_test, self.y_test, self.cfg.evaluation.batch_size)
        out: dict[str, object] = {
            "evaluated": True,
            "global_test_acc": acc,
            "global_test_loss": loss,
        }
        targets = self.eval_targets(trained)
        if not targets:
            return out
        roles = dict(targets)
        device_ids = [d for d, _ in targets]
        replies = self._send(round_, "evaluate", device_ids)
        outcome = self._check(replies, device_ids, train=False)
        rows: list[DeviceRow] = []
        for dev, m in outcome.valid:
            rec: MetricRecord = m.content[METRICS_KEY]
            metrics = {k: float(v) for k, v in rec.items() if isinstance(v, (int, float))}
            missing = [k for k in ("global-acc", "personal-acc") if k not in metrics]
            if dev not in roles:
                log.warning("ignored an evaluate reply from unknown device %d", dev)
                continue
            if missing:
                outcome.rejected.append({"device": dev, "reason": f"metrics lack {missing}"})
                continue
            rows.append(device_row(dev, roles[dev], metrics))
        train_rows = [r for r in rows if r["role"] == "train"]
        held_rows = [r for r in rows if r["role"] == "holdout"]
        out["devices"] = device_summary(train_rows)
        if self.holdout:
            out["holdout"] = holdout_summary(held_rows)
        problems = sorted(
            outcome.failed + outcome.rejected,
            key=lambda f: int(f["device"]),  # type: ignore[call-overload]
        )
        out["eval_failed"] = len(problems)
        if problems:
            out["eval_failures"] = problems
        out["eval_bytes_down"] = float(_nbytes(self.global_arrays.values()) * len(device_ids))
        self.last_device_rows = rows  # in device-id order: outcome.valid is sorted
        write_device_rows(self.run_dir / DEVICES_FILE, round_, self.last_device_rows)
        return out


def manifest(spec: ModelSpec, round_: int, sha256: str, metrics: dict[str, object]) -> str:
    model = build_model(spec)
    return json.dumps(
        {
            "round": round_,
            "sha256": sha256,
            "parameter_count": count_parameters(model),
            "model": spec.model_dump(),
            "metrics": metrics,
        },
        indent=1,
        sort_keys=True,
    )
