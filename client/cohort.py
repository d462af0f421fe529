"""Run a message's devices one after another on one resident model (pfl-research style).

Why: Flower's per-message cost (encode, Ray call, routing) is paid once per message;
carrying several devices per message amortises it. Each device still starts from the
same global weights (copied in place into the resident model), uses its own data,
state and seeded randomness, so a device's update does not depend on which cohort
it ran in. A device that fails is reported with a short reason; the others go on.
"""

from __future__ import annotations

import time

import numpy as np

from client.algorithms import get_algorithm
from client.attack import poison_data, poison_update, reported_examples
from client.coldstart import cold_start_metrics
from client.drift import with_drift
from client.measure import evaluate_models
from client.runtime import DeviceEnv, device_data, device_store, model_for
from client.state import ROUND_KEY, StateCorruptError
from common.protocol import CohortReply, DeviceFailure, EvalReport, RoundInstructions, TrainReport
from common.seeding import torch_generator
from common.weights import Arrays

MAX_REASON = 300
"""Failure reasons travel in the reply and land in metrics.jsonl: keep them short."""


class StaleRoundError(RuntimeError):
    """A train message for a round this device has already moved past."""


def short_reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


def train_device(
    device: int, env: DeviceEnv, task: RoundInstructions, global_arrays: Arrays
) -> tuple[TrainReport, Arrays]:
    """One device's round: load its state, train from the global model, save its state."""
    t0 = time.perf_counter()
    data = poison_data(task, device, with_drift(device_data(env, device), task, device))
    store = device_store(env)
    algo = get_algorithm(task.algorithm)
    reset = None
    try:
        state = store.load(device) if algo.spec.trains_from_state else store.load_meta(device)
    except StateCorruptError as err:
        # A damaged state file must not exclude the device for good: keep the file for
        # inspection, start over from the served model, and say so in the report.
        kept = store.quarantine(device, task.round)
        reset = f"personal state unreadable ({str(err)[:120]}); kept as {kept.name}"
        state = None
    if state is not None and int(state.meta.get(ROUND_KEY, -1)) >= task.round:
        # A message the server already gave up on (e.g. delivered after a restart):
        # training on it would overwrite newer personal state.
        raise StaleRoundError(
            f"device {device} already trained in round {state.meta[ROUND_KEY]}; "
            f"ignoring the late message for round {task.round}"
        )
    # First join of a real device (no personal state yet): what the served model gives.
    cold = (
        cold_start_metrics(
            env.model_server,
            store.root,
            data,
            task.evaluation.batch_size,
            env.model_server_ca,
            env.model_server_key,
        )
        if state is None
        else {}
    )
    gen = torch_generator(task.seed, "train", task.round, device)
    if device in task.step_limits:
        task = task.model_copy(update={"max_steps": task.step_limits[device]})
    update = algo.client_update(model_for(task.model_spec), global_arrays, state, data, task, gen)
    update.state.meta[ROUND_KEY] = task.round
    store.save(device, update.state, durable=task.durable_state)
    m = update.metrics
    report = TrainReport(
        device=device,
        num_examples=reported_examples(task, device, int(data.y_train.shape[0])),
        train_loss=float(m["train_loss"]),
        steps=int(m.get("steps", 0)),
        personal_loss=m.get("personal_loss"),
        apfl_alpha=m.get("alpha"),
        train_time_s=time.perf_counter() - t0,
        cold_start_acc=cold.get("acc"),
        cold_start_version=cold.get("version"),
        cold_start_failed=bool(cold.get("failed", False)),
        state_reset=reset,
    )
    return report, poison_update(task, device, update.shared, global_arrays)


def _finite(arrays: Arrays) -> bool:
    return all(not (v.dtype.kind == "f" and not np.isfinite(v).all()) for v in arrays.values())


def train_cohort(
    env: DeviceEnv, task: RoundInstructions, global_arrays: Arrays
) -> tuple[CohortReply, Arrays]:
    """Train every device of the message; return the typed reply and its arrays.

    Stacked layout: array ``k`` has one row per report, in report order. Sum layout
    (``task.preaggregate``): one float64 ``sum(num_examples * update)`` over the
    devices whose update is finite, accumulated in device-id order.
    """
    reports: list[TrainReport] = []
    failures: list[DeviceFailure] = []
    rows: list[Arrays] = []
    sums: dict[str, np.ndarray] = {}
    total = 0.0
    for device in env.cohort(task.devices):
        try:
            report, shared = train_device(device, env, task, global_arrays)
        except Exception as err:  # one device's failure must not sink its cohort
            failures.append(DeviceFailure(device=device, reason=short_reason(err)))
            continue
        if not task.preaggregate:
            reports.append(report)
            rows.append(shared)
            continue
        ok = _finite(shared)
        reports.append(report.model_copy(update={"valid": ok}))
        if ok:
            w = float(report.num_examples)
            for k, v in shared.items():
                acc = sums.get(k)
                if acc is None:
                    sums[k] = v.astype(np.float64) * w
                else:
                    acc += v.astype(np.float64) * w
            total += w
    if task.preaggregate:
        reply = CohortReply(
            kind="train", train=reports, failures=failures, layout="sum", weight_total=total
        )
        return reply, sums
    stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]} if rows else {}
    layout = "stacked" if rows else "none"
    return CohortReply(kind="train", train=reports, failures=failures, layout=layout), stacked


def evaluate_cohort(env: DeviceEnv, task: RoundInstructions, global_arrays: Arrays) -> CohortReply:
    """Served, personalized and fine-tuned accuracy of every device of the message.

    Reads personal state, never writes it: measuring must not change training. The
    fine-tune's randomness comes from (seed, "eval", round, device) alone.
    """
    algo = get_algorithm(task.algorithm)
    model = model_for(task.model_spec)
    store = device_store(env)
    reports: list[EvalReport] = []
    failures: list[DeviceFailure] = []
    for device in env.cohort(task.devices):
        try:
            data = with_drift(device_data(env, device), task, device)
            state = store.load(device)
            gen = torch_generator(task.seed, "eval", task.round, device)
            results = evaluate_models(model, algo, global_arrays, state, data, task, gen)
            reports.append(
                EvalReport(device=device, num_train=int(data.y_train.shape[0]), **results)
            )
        except Exception as err:  # reported per device; the cohort goes on
            failures.append(DeviceFailure(device=device, reason=short_reason(err)))
    return CohortReply(kind="evaluate", evaluate=reports, failures=failures)
