"""What travels between server and devices: one typed task out, one typed reply back.

Why: a real device never sees the server's config file, so everything it needs to
train travels in the message. The algorithm's settings are not re-declared here:
the task *embeds* the config's ``client``, ``evaluation`` and ``attack`` sections, so
the value a device trains with is, by construction, the value the user set
(``task_for`` is the one place a task is derived from the config).

A message may carry several devices (a *cohort*: simulation trains them one after
another on one resident model); the reply carries each device's update as one row
of stacked arrays plus a typed report per device, or, with ``preaggregate``, one
partial weighted sum. Reports hold scalars only, never samples or labels.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from common.config import ClientConfig, EvaluationConfig, ExperimentConfig
from common.config_attack import AttackConfig
from common.drift import DriftSpec

CONFIG_KEY = "config"
ARRAYS_KEY = "arrays"
REPORT_KEY = "report"
TASK_FIELD = "task"
"""The ConfigRecord field holding the task as JSON (a ConfigRecord holds flat values)."""
REPLY_FIELD = "reply"
QUERY_HELLO = "hello"
WEIGHT_KEY = "num-examples"
"""The MetricRecord key Flower strategies weight by (we set it from what the server knows)."""

Kind = Literal["train", "evaluate"]


class _Wire(BaseModel):
    """``ser_json_inf_nan="constants"``: a device whose training diverged reports a NaN
    loss; as JSON ``null`` that would make its whole cohort's reply unreadable instead
    of letting the server reject the non-finite update with its reason."""

    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class RoundInstructions(_Wire):
    """One message's task: which devices, which round, and the settings to use."""

    round: int = Field(ge=0)
    seed: int = Field(ge=0)
    model_spec: str
    """``ModelSpec`` as JSON."""
    client: ClientConfig
    evaluation: EvaluationConfig
    torch_threads: int = Field(1, ge=1)
    run_dir: str = ""
    """The server's run folder; simulation devices find their data there."""
    devices: list[int] = Field(default_factory=list)
    """The cohort, in device-id order; empty for a real device (it is one device)."""
    durable_state: bool = True
    """fsync personal state (a real device's disk); simulation skips it: a crashed
    simulation is rerun, and fsync per device dominated small-model rounds."""
    preaggregate: bool = False
    """Reply with one weighted sum of the cohort's updates instead of each update."""
    step_limits: dict[int, int] = Field(default_factory=dict)
    """Per device: cap on each local training pass (a straggler's partial work before
    the virtual deadline); devices not listed train fully."""
    max_steps: int = Field(0, ge=0)
    """The cap for the device being trained (set on the device from ``step_limits``)."""
    drift: DriftSpec | None = None
    """A drift scenario in force this round (simulation only; None: none)."""
    attack: AttackConfig = AttackConfig()
    """Simulated poisoning (``kind = "none"``: every device is honest)."""
    num_devices: int = Field(0, ge=0)
    """Population size: which devices are malicious follows from it and the seed."""

    @property
    def algorithm(self) -> str:
        return self.client.algorithm

    def to_record_fields(self) -> dict[str, Any]:
        return {TASK_FIELD: self.model_dump_json()}

    @classmethod
    def from_record_fields(cls, record: Any) -> RoundInstructions:
        try:
            text = record[TASK_FIELD]
        except KeyError:
            raise ValueError(
                f"message config lacks '{TASK_FIELD}': the server and this device run "
                "different hybridfl versions"
            ) from None
        return cls.model_validate_json(str(text))


def task_for(
    cfg: ExperimentConfig,
    round_: int,
    model_spec_json: str,
    run_dir: str,
    devices: list[int] | None = None,
    *,
    durable_state: bool = True,
    preaggregate: bool = False,
    step_limits: dict[int, int] | None = None,
) -> RoundInstructions:
    """The one place a device task is derived from the experiment config."""
    client = cfg.client
    if cfg.scenario.lr_spike_round and round_ == cfg.scenario.lr_spike_round:
        client = client.model_copy(update={"lr": client.lr * cfg.scenario.lr_spike_factor})
    return RoundInstructions(
        round=round_,
        seed=cfg.seed,
        model_spec=model_spec_json,
        client=client,
        evaluation=cfg.evaluation,
        torch_threads=cfg.simulation.torch_threads,
        run_dir=run_dir,
        devices=list(devices or []),
        durable_state=durable_state,
        preaggregate=preaggregate,
        step_limits=dict(step_limits or {}),
        drift=_drift(cfg, round_),
        attack=cfg.attack,
        num_devices=cfg.partition.num_devices,
    )


def _drift(cfg: ExperimentConfig, round_: int) -> DriftSpec | None:
    sc = cfg.scenario
    if not sc.drift_round or round_ < sc.drift_round:
        return None
    return DriftSpec(from_round=sc.drift_round, share=sc.drift_share, seed=cfg.seed)


class TrainReport(_Wire):
    """One device's training result: scalars only."""

    device: int
    num_examples: int = Field(ge=0)
    """Training samples the device used (the server checks it against what it knows)."""
    train_loss: float
    steps: int = Field(ge=0)
    personal_loss: float | None = None
    """Ditto: loss of the personal model's own objective."""
    apfl_alpha: float | None = None
    valid: bool = True
    """Pre-aggregation only: whether the worker found the update finite (else excluded)."""
    train_time_s: float = 0.0
    """Wall-clock seconds on the worker (recorded in timings, not in metrics)."""
    cold_start_acc: float | None = None
    """First join of a real device: the served model's accuracy on its test split."""
    cold_start_version: int | None = None
    cold_start_failed: bool = False
    state_reset: str | None = None
    """Why the device's personal state was set aside (unreadable) before this round."""


class EvalReport(_Wire):
    """One device's evaluation: served, personalized and fine-tuned model, same examples."""

    device: int
    num_test: int = Field(ge=0)
    num_train: int = Field(ge=0)
    has_personal: bool
    global_acc: float
    global_loss: float
    personal_acc: float
    personal_loss: float
    finetuned_acc: float | None = None
    finetuned_loss: float | None = None
    finetune_train_loss: float | None = None
    finetune_steps: int | None = None


class DeviceFailure(_Wire):
    device: int
    reason: str


class CohortReply(_Wire):
    """The typed part of a reply; arrays travel beside it in the ArrayRecord."""

    kind: Kind
    train: list[TrainReport] = Field(default_factory=list)
    """In the order of the stacked arrays' first axis."""
    evaluate: list[EvalReport] = Field(default_factory=list)
    failures: list[DeviceFailure] = Field(default_factory=list)
    layout: Literal["stacked", "sum", "none"] = "none"
    """``stacked``: each array has one row per ``train`` report; ``sum``: one float64
    sum of ``weight * update`` over the valid reports (weights = ``num_examples``)."""
    weight_total: float = 0.0

    def to_record_fields(self) -> dict[str, Any]:
        return {REPLY_FIELD: self.model_dump_json()}

    @classmethod
    def from_record_fields(cls, record: Any) -> CohortReply:
        return cls.model_validate_json(str(record[REPLY_FIELD]))
