"""The Flower ClientApp: decode the message, run the algorithm, encode the reply.

A reply carries model arrays and scalar metrics only, never samples or labels.
"""

from __future__ import annotations

import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.algorithms import get_algorithm
from client.coldstart import cold_start_metrics
from client.evaluation import evaluate_models
from client.runtime import device_data, device_env, device_store, model_for, set_threads
from common.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, RoundInstructions
from common.records import from_record, to_record
from common.seeding import torch_generator

app = ClientApp()


class StaleRoundError(RuntimeError):
    """A train message for a round this device has already moved past."""


def _instructions(msg: Message) -> RoundInstructions:
    return RoundInstructions.from_flat(msg.content[CONFIG_KEY])


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Registration: tell the server which device this node is and its data sizes."""
    env = device_env(context, _instructions(msg).run_dir)
    data = device_data(env)
    metrics = MetricRecord(
        {
            "device-id": env.device_id,
            "num-train": int(data.y_train.shape[0]),
            "num-test": int(data.y_test.shape[0]),
        }
    )
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training from the served global model."""
    t0 = time.perf_counter()
    instr = _instructions(msg)
    set_threads(instr.torch_threads)
    env = device_env(context, instr.run_dir)
    data = device_data(env)
    store = device_store(env)
    algo = get_algorithm(instr.algorithm)
    model = model_for(instr.model_spec)
    global_arrays = from_record(msg.content[ARRAYS_KEY])
    state = store.load(env.device_id)
    if state is not None and int(state.meta.get("last_round", -1)) >= instr.round:
        # A message the server already gave up on (e.g. delivered after a restart):
        # training on it would overwrite newer personal state.
        raise StaleRoundError(
            f"device {env.device_id} already trained in round {state.meta['last_round']}; "
            f"ignoring the late message for round {instr.round}"
        )
    # First join (no personal state yet): what the served model gives this device.
    cold = (
        {}
        if state is not None
        else cold_start_metrics(env.model_server, store.root, data, instr.eval_batch_size)
    )
    gen = torch_generator(instr.seed, "train", instr.round, env.device_id)
    update = algo.client_update(model, global_arrays, state, data, instr, gen)
    update.state.meta["last_round"] = instr.round
    store.save(env.device_id, update.state)
    metrics = {
        "num-examples": int(data.y_train.shape[0]),
        "device-id": env.device_id,
        "train-time-s": time.perf_counter() - t0,
        **{k.replace("_", "-"): float(v) for k, v in update.metrics.items()},
        **cold,
    }
    content = RecordDict({ARRAYS_KEY: to_record(update.shared), METRICS_KEY: MetricRecord(metrics)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_device(msg: Message, context: Context) -> Message:
    """Served global, personalized and fine-tuned global model on the device's test split.

    Reads the personal state, never writes it: evaluation must not change training.
    The fine-tune's randomness comes from (seed, "eval", round, device) alone.
    """
    instr = _instructions(msg)
    set_threads(instr.torch_threads)
    env = device_env(context, instr.run_dir)
    data = device_data(env)
    algo = get_algorithm(instr.algorithm)
    model = model_for(instr.model_spec)
    global_arrays = from_record(msg.content[ARRAYS_KEY])
    state = device_store(env).load(env.device_id)
    gen = torch_generator(instr.seed, "eval", instr.round, env.device_id)
    results = evaluate_models(model, algo, global_arrays, state, data, instr, gen)
    metrics = {
        **results,
        "num-examples": int(data.y_test.shape[0]),
        "num-train": int(data.y_train.shape[0]),
        "device-id": env.device_id,
        "has-personal": int(state is not None),
    }
    return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)
