"""The Flower ClientApp: decode the task, run its devices, encode the reply.

Thin on purpose: the work is in ``client.cohort``. A reply carries model arrays and
one typed report of scalars (``common.protocol.CohortReply``), never samples or labels.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.cohort import StaleRoundError, evaluate_cohort, train_cohort
from client.runtime import device_data, device_env, set_threads
from common.protocol import ARRAYS_KEY, CONFIG_KEY, REPORT_KEY, RoundInstructions
from common.records import from_record, to_record

app = ClientApp()

__all__ = ["StaleRoundError", "app"]


def _task(msg: Message) -> RoundInstructions:
    return RoundInstructions.from_record_fields(msg.content[CONFIG_KEY])


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Registration of a real device: which device this node is and its data sizes."""
    env = device_env(context, _task(msg).run_dir)
    if env.device_id is None:
        raise RuntimeError("hello is for real devices; a simulation slot is not a device")
    data = device_data(env, env.device_id)
    metrics = MetricRecord(
        {
            "device-id": env.device_id,
            "num-train": int(data.y_train.shape[0]),
            "num-test": int(data.y_test.shape[0]),
        }
    )
    return Message(RecordDict({REPORT_KEY: metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training, for every device the message names."""
    task = _task(msg)
    set_threads(task.torch_threads)
    env = device_env(context, task.run_dir)
    reply, arrays = train_cohort(env, task, from_record(msg.content[ARRAYS_KEY]))
    content = RecordDict(
        {ARRAYS_KEY: to_record(arrays), REPORT_KEY: ConfigRecord(reply.to_record_fields())}
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_devices(msg: Message, context: Context) -> Message:
    """Served global, personalized and fine-tuned model on each device's test split."""
    task = _task(msg)
    set_threads(task.torch_threads)
    env = device_env(context, task.run_dir)
    reply = evaluate_cohort(env, task, from_record(msg.content[ARRAYS_KEY]))
    return Message(RecordDict({REPORT_KEY: ConfigRecord(reply.to_record_fields())}), reply_to=msg)
