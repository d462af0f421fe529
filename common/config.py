"""The experiment schema: one typed config from TOML file to ClientApp.

Why pydantic with ``extra="forbid"`` everywhere: a typo in a key (``local_epoch``)
must stop the run with the key's name, not silently fall back to a default and
waste an hour of simulation.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.config_attack import AttackConfig, robustness_checks
from common.config_clock import ClockConfig
from common.config_rollout import RolloutConfig
from common.config_scenario import ScenarioConfig
from common.personalization import ALGORITHMS

DatasetName = Literal["digits", "npz", "idx", "femnist", "synthetic"]
PartitionMethod = Literal["iid", "dirichlet", "pathological", "shards", "natural"]
ModelName = Literal["logistic", "mlp2nn", "cnn"]
StrategyName = Literal[
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
]
"""Flower strategies (``server.aggregation.STRATEGIES`` builds each; a test checks both agree)."""
AlgorithmName = Literal["fedavg", "fedprox", "fedper", "fedrep", "fedbn", "ditto", "apfl"]
"""Personalization algorithms (``common.personalization.ALGORITHMS`` declares what each keeps)."""


AUTO_ALL_LIMIT = 1000
"""Populations up to this size evaluate every device by default; larger ones a sample."""


class ConfigError(ValueError):
    """A config problem, already phrased for the user (key, value, fix)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the samples come from. ``path`` is required for file datasets."""

    dataset: DatasetName = "digits"
    path: str = ""
    """File or folder to load; a relative one is looked up under ``root``."""
    root: str = ""
    """Data folder for a relative ``path`` (empty: ``$HYBRIDFL_DATA``, else the current
    folder); ``hybridfl data get NAME --to DIR`` fills one."""
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    """Share of each device's samples kept as that device's own test split."""
    synthetic_alpha: float = Field(1.0, ge=0.0)
    """Synthetic(alpha, beta) (Li et al., FedProx): how much devices' models differ."""
    synthetic_beta: float = Field(1.0, ge=0.0)
    """Synthetic(alpha, beta): how much devices' feature distributions differ."""

    @model_validator(mode="after")
    def _path_needed(self) -> DataConfig:
        if self.dataset not in ("digits", "synthetic") and not self.path:
            raise ValueError(
                f"data.path is required for dataset '{self.dataset}': set it to the "
                "file or folder to load (e.g. --set data.path=mnist.npz, looked up under "
                "data.root or $HYBRIDFL_DATA; `hybridfl data get mnist --to DIR` fetches it)"
            )
        return self


class PartitionConfig(_Section):
    """How the training pool is split across devices."""

    method: PartitionMethod = "dirichlet"
    num_devices: int = Field(20, ge=1)
    alpha: float = Field(0.5, gt=0.0)
    """Dirichlet concentration; smaller means more label skew."""
    classes_per_device: int = Field(2, ge=1)
    """Pathological split: number of distinct labels per device."""
    class_assignment: Literal["seeded", "pflib"] = "seeded"
    """Pathological split: which classes each device holds. ``seeded``: consecutive
    classes after a seeded relabelling (the pairs move with the seed); ``pflib``:
    PFLlib's assignment (classes in label order to the lowest-numbered devices with
    room: device 0 holds classes 0 and 1, as in PFLlib's published results)."""
    shards_per_device: int = Field(2, ge=1)
    """Shards split (McMahan et al.): shards of sorted labels per device."""
    min_samples_per_device: int = Field(2, ge=2)
    """Every device needs at least one train and one test sample."""

    @model_validator(mode="after")
    def _assignment_is_pathological(self) -> PartitionConfig:
        if self.class_assignment != "seeded" and self.method != "pathological":
            raise ValueError(
                f"partition.class_assignment = '{self.class_assignment}' applies to "
                f"partition.method = 'pathological' only (method is '{self.method}'): "
                "remove it or set partition.method = 'pathological'"
            )
        return self


class ModelConfig(_Section):
    """Architecture; input shape and class count come from the dataset."""

    name: ModelName = "cnn"
    hidden: int = Field(200, ge=1)
    """Width of the 2NN hidden layers (McMahan et al.: 200)."""
    batch_norm: bool = False
    """CNN only: batch-norm after each convolution (needed by FedBN)."""


class StrategyConfig(_Section):
    """Server-side aggregation (a strategy of ``flwr.serverapp.strategy``)."""

    name: StrategyName = "fedavg"
    fraction_train: float = Field(0.5, gt=0.0, le=1.0)
    devices_per_round: int = Field(0, ge=0)
    """Cross-device cohort size K: exactly K devices per round whatever the population
    (0 = ``fraction_train`` of the training pool)."""
    min_train_devices: int = Field(1, ge=1)
    server_lr: float = Field(0.01, gt=0.0)
    """FedAdam/FedYogi/FedAdagrad: server learning rate (eta); FedAvgM: server lr."""
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """FedAvgM: server momentum."""
    num_malicious: int = Field(0, ge=0)
    """Krum/MultiKrum/Bulyan: number of malicious devices assumed per round."""
    trim_beta: float = Field(0.2, gt=0.0, lt=0.5)
    """FedTrimmedAvg: fraction cut from each end before averaging."""
    clip_norm: float = Field(0.0, ge=0.0)
    """Server-side norm bounding: each update's distance (L2, over the shared weights)
    from the current global model is scaled down to at most this before the strategy
    sees it; 0 = off."""
    round_timeout_s: float = Field(600.0, gt=0.0)
    max_failed_fraction: float = Field(0.5, ge=0.0, le=1.0)
    """A round in which more than this share of the selected devices fail (crash, dead
    worker, timeout) stops the run with a non-zero exit and the cause: a run that
    quietly trains on a fraction of its devices is a different experiment."""


class ClientConfig(_Section):
    """On-device training: the personalization algorithm and its optimiser."""

    algorithm: AlgorithmName = "fedavg"
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(10, ge=1)
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    proximal_mu: float = Field(0.01, ge=0.0)
    """fedprox: strength of the proximal term (mu/2)||w - w_global||^2 (the one
    declaration: ``strategy.name = "fedprox"`` uses it too)."""
    head_epochs: int = Field(1, ge=1)
    """fedrep: epochs of head-only training before the body is trained."""
    ditto_lambda: float = Field(0.1, ge=0.0)
    """ditto: pull of the personal model toward the global one."""
    apfl_alpha: float = Field(0.5, ge=0.0, le=1.0)
    """apfl: initial mixing weight of the personal model."""
    apfl_alpha_lr: float = Field(0.01, ge=0.0)
    """apfl: learning rate of the mixing weight alpha."""
    partial_work: bool = False
    """With ``clock.deadline_s``: a straggler's steps up to the deadline are used
    (FedProx's partial work) instead of being discarded."""


class SimulationConfig(_Section):
    """Ray backend of Flower's Simulation Engine."""

    num_cpus_per_client: int = Field(1, ge=1)
    num_gpus_per_client: float = Field(0.0, ge=0.0)
    max_workers: int = Field(0, ge=0)
    """CPUs given to Ray (0 = all cores); with num_cpus_per_client this caps the
    number of ClientApps running in parallel. With ``ray_address`` set it is not given
    to Ray: set it to the cluster's total CPUs so that hybridfl starts enough slots
    (two per ClientApp worker) to keep every node busy."""
    ray_address: str = ""
    """Address of an existing Ray cluster (e.g. ``ray://head:10001`` or ``auto``);
    empty starts a local Ray instance inside the run folder."""
    torch_threads: int = Field(1, ge=1)
    """Torch intra-op threads per ClientApp; 1 avoids oversubscribing cores."""
    slots: int = Field(0, ge=0)
    """Flower virtual SuperNodes, i.e. execution slots (not devices: a message to a slot
    carries several device ids). 0 = twice the Ray workers, so every worker always has
    the next message queued."""
    devices_per_message: int = Field(0, ge=0)
    """Devices trained one after another in one message (a cohort); 0 = chosen by
    hybridfl from the round's cohort and the slots; 1 = one message per device."""
    preaggregate: bool = False
    """Workers return one partial weighted sum per message instead of every device's
    update (weighted-mean strategies only: fedavg, fedprox, fedadam)."""
    max_in_flight: int = Field(0, ge=0)
    """Messages in flight at once (0 = one per slot): bounds the SuperLink's scan."""

    def workers(self, cpu_count: int) -> int:
        """Ray workers (ClientApp actors) this config gives on a machine of ``cpu_count``."""
        cpus = self.max_workers if self.max_workers > 0 else cpu_count
        return max(1, cpus // self.num_cpus_per_client)

    def num_slots(self, cpu_count: int) -> int:
        """How many Flower virtual SuperNodes a simulation starts."""
        return self.slots if self.slots > 0 else 2 * self.workers(cpu_count)


class EvaluationConfig(_Section):
    """When, where and how models are evaluated.

    Every evaluated device measures three models on the same test examples: the
    served global model, its personalized model, and the global model fine-tuned for
    ``finetune_steps`` steps on its own training split (what a brand-new user would
    get). Held-out devices never train, so they measure how the served model and a
    quick fine-tune do for users the federation has never seen.
    """

    every: int = Field(1, ge=1)
    """Evaluate every k rounds (the last round is always evaluated)."""
    batch_size: int = Field(512, ge=1)
    devices: Literal["auto", "participants", "all", "sample"] = "auto"
    """Which training devices are evaluated: ``participants`` (those that trained this
    round), ``all``, or ``sample`` (a seeded sample of ``sample_devices`` per evaluation);
    ``auto`` is ``all`` up to ``AUTO_ALL_LIMIT`` devices and ``sample`` above. Held-out
    devices are evaluated every time (a seeded sample of them above the same limit)."""
    sample_devices: int = Field(100, ge=1)
    """Devices per evaluation under ``devices = "sample"`` (and for held-out devices in
    large populations)."""
    finetune_steps: int = Field(5, ge=0)
    """Minibatch SGD steps of the fine-tuned model (batch size = client.batch_size);
    0 skips fine-tuning (no finetuned accuracy is reported)."""
    finetune_lr: float = Field(0.0, ge=0.0)
    """Learning rate of the fine-tune; 0 uses client.lr."""
    holdout_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of devices held out: never sampled for training, evaluated every time."""

    def mode(self, num_devices: int) -> Literal["participants", "all", "sample"]:
        """``devices`` with ``auto`` resolved for a population of ``num_devices``."""
        if self.devices != "auto":
            return self.devices
        return "all" if num_devices <= AUTO_ALL_LIMIT else "sample"

    def num_holdout(self, num_devices: int) -> int:
        """How many of ``num_devices`` are held out (at least one when the fraction is > 0)."""
        if self.holdout_fraction <= 0.0:
            return 0
        return max(1, round(self.holdout_fraction * num_devices))


class OutputConfig(_Section):
    """Where the run folder goes."""

    root: str = "runs"
    plot: bool = True
    publish_every: int = Field(1, ge=1)
    """Publish every k-th global version to the run's model registry (version 0 and
    the last round always); each version of a large model costs its size on disk."""


class ExperimentConfig(_Section):
    """A whole experiment. Sections mirror the TOML tables."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]*[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
    """Run-folder name: letters, digits, ``_.-``; not ``.`` or ``..``."""
    seed: int = Field(0, ge=0)
    rounds: int = Field(10, ge=1)
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    strategy: StrategyConfig = StrategyConfig()
    client: ClientConfig = ClientConfig()
    simulation: SimulationConfig = SimulationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    output: OutputConfig = OutputConfig()
    clock: ClockConfig = ClockConfig()
    rollout: RolloutConfig = RolloutConfig()
    scenario: ScenarioConfig = ScenarioConfig()
    attack: AttackConfig = AttackConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        if self.partition.method == "natural" and self.data.dataset not in ("femnist", "synthetic"):
            raise ValueError(
                "partition.method = 'natural' needs data with writer ids: set "
                "data.dataset = 'femnist' or choose iid/dirichlet/pathological/shards"
            )
        if self.client.algorithm == "fedbn" and not (
            self.model.name == "cnn" and self.model.batch_norm
        ):
            raise ValueError(
                "client.algorithm = 'fedbn' keeps batch-norm layers on the device, but the "
                "model has none: set model.name = 'cnn' and model.batch_norm = true"
            )
        if ALGORITHMS[self.client.algorithm].needs_head and self.model.name == "logistic":
            raise ValueError(
                f"client.algorithm = '{self.client.algorithm}' keeps the head on the device, "
                "and the logistic model is all head (nothing would be shared): set "
                "model.name = 'mlp2nn' or 'cnn'"
            )
        if self.strategy.name == "fedprox" and self.client.algorithm != "fedprox":
            raise ValueError(
                "strategy.name = 'fedprox' is FedAvg aggregation for devices that train with "
                f"a proximal term, but client.algorithm = '{self.client.algorithm}' has none: "
                "set client.algorithm = 'fedprox' (mu is client.proximal_mu) or "
                "strategy.name = 'fedavg'"
            )
        if self.data.dataset == "synthetic" and self.model.name == "cnn":
            raise ValueError(
                "data.dataset = 'synthetic' has 60 features, not images: set "
                "model.name = 'logistic' or 'mlp2nn'"
            )
        if self.data.dataset == "synthetic" and self.partition.method != "natural":
            raise ValueError(
                "data.dataset = 'synthetic' is generated per device (its split is natural): "
                "set partition.method = 'natural'"
            )
        if self.strategy.min_train_devices > self.partition.num_devices:
            raise ValueError(
                f"strategy.min_train_devices ({self.strategy.min_train_devices}) is "
                f"larger than partition.num_devices ({self.partition.num_devices}): "
                "lower it or add devices"
            )
        held = self.evaluation.num_holdout(self.partition.num_devices)
        robustness_checks(self, self.partition.num_devices - held)
        k = self.strategy.devices_per_round
        if k and k < self.strategy.min_train_devices:
            raise ValueError(
                f"strategy.devices_per_round ({k}) is below strategy.min_train_devices "
                f"({self.strategy.min_train_devices}): every round would fail; raise the "
                "first or lower the second"
            )
        if k > self.partition.num_devices - held:
            raise ValueError(
                f"strategy.devices_per_round ({k}) is more than the "
                f"{self.partition.num_devices - held} devices that may train "
                "(partition.num_devices minus held-out ones): lower it or add devices"
            )
        if self.partition.num_devices - held < self.strategy.min_train_devices:
            raise ValueError(
                f"evaluation.holdout_fraction ({self.evaluation.holdout_fraction}) holds out "
                f"{held} of partition.num_devices ({self.partition.num_devices}) devices, "
                f"leaving {self.partition.num_devices - held} to train, fewer than "
                f"strategy.min_train_devices ({self.strategy.min_train_devices}): lower "
                "evaluation.holdout_fraction or strategy.min_train_devices, or add devices"
            )
        self._clock_checks(self.partition.num_devices - held)
        return self

    def _clock_checks(self, trainable: int) -> None:
        c = self.clock
        if c.mode == "async":
            if c.concurrency > trainable:
                raise ValueError(
                    f"clock.concurrency ({c.concurrency}) is more than the {trainable} "
                    "devices that may train: lower clock.concurrency or add devices"
                )
            if c.buffer_size < self.strategy.min_train_devices:
                raise ValueError(
                    f"clock.buffer_size ({c.buffer_size}) is below "
                    f"strategy.min_train_devices ({self.strategy.min_train_devices}): every "
                    "aggregation would fail; raise the first or lower the second"
                )
        if self.client.partial_work and not (c.mode == "sync" and c.deadline_s > 0):
            raise ValueError(
                "client.partial_work = true uses a straggler's steps up to the round's "
                "deadline, but there is none: set clock.mode = 'sync' and "
                "clock.deadline_s > 0, or client.partial_work = false"
            )


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key; remove it or check its spelling")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def validate_config(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a raw dict, turning pydantic's errors into one readable message."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def _parse_value(text: str) -> Any:
    """Parse an override value as a TOML value, falling back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config dict (copied)."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' has no '=': write it as section.key=value "
                "(e.g. --set client.lr=0.01)"
            )
        dotted, text = item.split("=", 1)
        parts = [p.strip() for p in dotted.strip().split(".")]
        if not all(parts) or len(parts) > 2:
            raise ConfigError(
                f"override key '{dotted}' must be 'key' or 'section.key' "
                "(e.g. rounds=5 or partition.alpha=0.1)"
            )
        target = out
        if len(parts) == 2:
            section = target.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise ConfigError(f"override '{dotted}': '{parts[0]}' is not a section")
            target = section
        target[parts[-1]] = _parse_value(text.strip())
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Load a TOML experiment (default: the bundled quickstart) plus overrides."""
    p = Path(path) if path else default_config_path()
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (expected a TOML experiment file)")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {p} is not UTF-8 text (byte {err.start}): save it as UTF-8 TOML"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {p} is not valid TOML: {err}") from None
    raw = apply_overrides(raw, overrides or [])
    return validate_config(raw, source=str(p))


def default_config_path() -> Path:
    """The bundled quickstart, found next to the packages (works in a FAB too)."""
    return Path(__file__).resolve().parent.parent / "configs" / "quickstart.toml"


def dump_config(cfg: ExperimentConfig) -> str:
    """Serialise the resolved config to TOML (all defaults spelled out)."""
    data = cfg.model_dump()
    top = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    blocks = ["\n".join(top)]
    for key, value in data.items():
        if isinstance(value, dict):
            body = "\n".join(f"{k} = {_toml_value(v)}" for k, v in value.items())
            blocks.append(f"[{key}]\n{body}")
    return "\n\n".join(blocks) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
