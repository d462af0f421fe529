"""Build a device task the way the server does, for tests that call algorithms directly."""

from __future__ import annotations

from typing import Any

from common.config import ClientConfig, EvaluationConfig
from common.models import ModelSpec
from common.protocol import RoundInstructions


def make_task(
    algorithm: str,
    spec: ModelSpec,
    *,
    round_: int = 1,
    seed: int = 0,
    evaluation: dict[str, Any] | None = None,
    **client: Any,
) -> RoundInstructions:
    """``client`` keys are ``ClientConfig`` fields; ``evaluation`` keys ``EvaluationConfig``'s."""
    return RoundInstructions(
        round=round_,
        seed=seed,
        model_spec=spec.model_dump_json(),
        client=ClientConfig(algorithm=algorithm, **client),  # type: ignore[arg-type]
        evaluation=EvaluationConfig(**(evaluation or {})),
    )
