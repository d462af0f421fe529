"""What the server tells a device each round, as one typed record.

Why: a real device never sees the server's config file. Everything it needs to
train (hyper-parameters, round, seed, model architecture) travels in the
message's ConfigRecord, validated on both ends by this one schema.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common.models import ModelSpec

CONFIG_KEY = "config"
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
QUERY_HELLO = "hello"


class RoundInstructions(BaseModel):
    """Per-round instructions for a device (flat, so it fits a ConfigRecord)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=0)
    seed: int = Field(ge=0)
    algorithm: str
    model_spec: str
    """``ModelSpec`` as JSON (a ConfigRecord holds flat values only)."""
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(10, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    proximal_mu: float = Field(0.0, ge=0)
    head_epochs: int = Field(1, ge=1)
    ditto_lambda: float = Field(0.0, ge=0)
    apfl_alpha: float = Field(0.5, ge=0, le=1)
    apfl_alpha_lr: float = Field(0.01, ge=0)
    eval_batch_size: int = Field(512, ge=1)
    finetune_steps: int = Field(0, ge=0)
    """Evaluation: SGD steps of the fine-tuned global model (0: no fine-tune)."""
    finetune_lr: float = Field(0.0, ge=0)
    """Evaluation: fine-tune learning rate; 0 uses ``lr``."""
    torch_threads: int = Field(1, ge=1)
    run_dir: str = ""
    """The server's run folder; devices in a simulation without their own
    ``run-dir`` (a bare ``flwr run .``) find their data there."""

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.model_validate_json(self.model_spec)

    def to_flat(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_flat(cls, record: Any) -> RoundInstructions:
        """Decode a ConfigRecord; keys added by a Flower strategy are mapped or dropped."""
        data = dict(record)
        if "proximal-mu" in data:  # FedProx strategy's key
            data["proximal_mu"] = float(data.pop("proximal-mu"))
        known = set(cls.model_fields)
        return cls.model_validate({k: v for k, v in data.items() if k in known})
