"""Device-side evaluation: served, personalized and freshly fine-tuned model, same examples.

Why three models: the served global model is what a user gets without
personalization; the personalized model is what this device built over the rounds
it trained; the fine-tuned global model (a few seeded SGD steps on the device's own
training split) is what personalization gives a brand-new user on day one. All three
are measured on the same test examples, so their differences are the device's gain.

Evaluation reads the personal state but never writes it: measuring must not change
training. Fine-tuning runs on the process's scratch model, which every later call
reloads from the arrays it is given.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from client.algorithms.base import Algorithm
from client.algorithms.loop import DeviceData, evaluate, make_optimizer, train_epochs
from client.state import PersonalState
from common.protocol import RoundInstructions
from common.weights import Arrays, load_arrays


def finetune(
    model: nn.Module,
    data: DeviceData,
    instr: RoundInstructions,
    generator: torch.Generator,
) -> tuple[float, int]:
    """Train ``model`` in place for exactly ``evaluation.finetune_steps`` minibatch steps.

    Whole epochs go through the shared loop; the remaining ``r`` steps train on the
    first ``r * batch_size`` examples of one more seeded permutation (fewer than an
    epoch's worth, so every batch is full and the step count is exact).
    Returns (mean loss, steps).
    """
    steps = instr.evaluation.finetune_steps
    n = int(data.y_train.shape[0])
    if steps <= 0 or n == 0:
        return 0.0, 0
    c, e = instr.client, instr.evaluation
    bs = c.batch_size
    per_epoch = math.ceil(n / bs)
    lr = e.finetune_lr if e.finetune_lr > 0 else c.lr
    opt = make_optimizer(model.parameters(), lr, c.momentum, c.weight_decay)
    total, done = 0.0, 0
    full, rest = divmod(steps, per_epoch)
    if full:
        loss, k = train_epochs(
            model,
            data.x_train,
            data.y_train,
            epochs=full,
            batch_size=bs,
            optimizer=opt,
            generator=generator,
        )
        total, done = total + loss * k, done + k
    if rest:
        idx = torch.randperm(n, generator=generator)[: rest * bs]
        loss, k = train_epochs(
            model,
            data.x_train[idx],
            data.y_train[idx],
            epochs=1,
            batch_size=bs,
            optimizer=opt,
            generator=generator,
        )
        total, done = total + loss * k, done + k
    return total / max(done, 1), done


def evaluate_models(
    model: nn.Module,
    algo: Algorithm,
    global_arrays: Arrays,
    state: PersonalState | None,
    data: DeviceData,
    instr: RoundInstructions,
    generator: torch.Generator,
) -> dict[str, float | int | bool]:
    """Global, personalized and (if ``finetune_steps`` > 0) fine-tuned accuracy and loss,
    keyed by the fields of ``common.protocol.EvalReport``.

    ``model`` is scratch space: its weights are overwritten. ``state`` is only read.
    """
    bs = instr.evaluation.batch_size
    load_arrays(model, global_arrays)
    g_loss, g_acc = evaluate(model, data.x_test, data.y_test, bs)
    algo.load_personalized(model, global_arrays, state)
    p_loss, p_acc = evaluate(model, data.x_test, data.y_test, bs)
    out: dict[str, float | int | bool] = {
        "num_test": int(data.y_test.shape[0]),
        "global_acc": g_acc,
        "global_loss": g_loss,
        "personal_acc": p_acc,
        "personal_loss": p_loss,
        "has_personal": state is not None,
    }
    if instr.evaluation.finetune_steps > 0:
        load_arrays(model, global_arrays)
        ft_train_loss, ft_steps = finetune(model, data, instr, generator)
        f_loss, f_acc = evaluate(model, data.x_test, data.y_test, bs)
        out |= {
            "finetuned_acc": f_acc,
            "finetuned_loss": f_loss,
            "finetune_train_loss": ft_train_loss,
            "finetune_steps": ft_steps,
        }
    return out
