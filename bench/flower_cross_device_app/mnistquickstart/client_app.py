"""mnistquickstart: the ClientApp (quickstart-pytorch's ``client_app.py``), train only."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mnistquickstart.task import load_data, load_model
from mnistquickstart.task import train as train_fn

# Flower ClientApp
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the model on local data."""
    model = load_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainloader = load_data(
        int(context.node_config["partition-id"]),
        int(context.run_config["batch-size"]),
        str(context.run_config["data-path"]),
        str(context.run_config["partition-path"]),
    )
    train_loss = train_fn(
        model,
        trainloader,
        int(context.run_config["local-epochs"]),
        float(msg.content["config"]["lr"]),
    )
    if context.run_config["keep-personal"]:
        context.state["personal-model"] = ArrayRecord(model.state_dict())
    metrics = {
        "train_loss": train_loss,
        "num-examples": len(trainloader.dataset),
        "torch-threads": torch.get_num_threads(),
    }
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)
