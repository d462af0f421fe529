"""Validated updates -> the next global weights, through a Flower strategy.

One adapter for every ``flwr.serverapp.strategy``: each round it calls the
strategy's own ``configure_train`` (over a one-node stand-in grid: hybridfl does
its own seeded selection) so whatever state a strategy keeps there (FedOpt's and
FedAvgM's current arrays) is set by Flower's code, not a copy of it; the config the
strategy would send is checked against what hybridfl's devices implement, so a
strategy that needs device-side behaviour we lack fails loudly instead of silently
misbehaving. Then ``aggregate_train`` runs on one message per accepted update,
weighted by the example count the server knows. Adding a strategy is a line in
``STRATEGIES`` (and its name in ``common.config.StrategyName``) plus its test.

Norm bounding (``strategy.clip_norm``) happens here, in one place, before any
strategy sees an update: it is a defence for every strategy, not a strategy itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)

from common.config import ExperimentConfig
from common.protocol import ARRAYS_KEY, WEIGHT_KEY
from common.records import from_record, to_record
from common.weights import Arrays

log = logging.getLogger("hybridfl.server")

COMMON: dict[str, Any] = {
    "fraction_train": 1.0,
    "fraction_evaluate": 0.0,
    "min_train_nodes": 1,
    "min_evaluate_nodes": 1,
    "min_available_nodes": 1,
    "weighted_by_key": WEIGHT_KEY,
}


@dataclass(frozen=True)
class StrategySpec:
    build: Callable[[ExperimentConfig], FedAvg]
    weighted_mean: bool
    """Aggregates a weighted mean of updates (or a server optimiser step on it): partial
    weighted sums from workers give the same result, so ``preaggregate`` is allowed."""
    sends: frozenset[str] = frozenset({"server-round"})
    """Config keys its ``configure_train`` sends that hybridfl's devices honour."""
    min_updates: Callable[[ExperimentConfig], int] = lambda c: 1
    """Fewest updates its ``aggregate_train`` accepts (Bulyan: 4f + 3)."""
    per_round: Callable[[Any, ExperimentConfig, int], None] | None = None
    """Sets what depends on the round's number of accepted updates, before aggregating."""


def _multikrum_select(strategy: MultiKrum, cfg: ExperimentConfig, n: int) -> None:
    """MultiKrum averages the ``n - f`` best-scored updates (El Mhamdi et al.); Flower's
    default, one, would make it Krum."""
    strategy.num_nodes_to_select = max(1, n - cfg.strategy.num_malicious)


STRATEGIES: dict[str, StrategySpec] = {
    "fedavg": StrategySpec(lambda c: FedAvg(**COMMON), True),
    "fedprox": StrategySpec(
        lambda c: FedProx(**COMMON, proximal_mu=c.client.proximal_mu),
        True,
        frozenset({"server-round", "proximal-mu"}),
    ),
    "fedavgm": StrategySpec(
        lambda c: FedAvgM(
            **COMMON,
            server_learning_rate=c.strategy.server_lr,
            server_momentum=c.strategy.server_momentum,
        ),
        True,
    ),
    "fedadam": StrategySpec(lambda c: FedAdam(**COMMON, eta=c.strategy.server_lr), True),
    "fedyogi": StrategySpec(lambda c: FedYogi(**COMMON, eta=c.strategy.server_lr), True),
    "fedadagrad": StrategySpec(lambda c: FedAdagrad(**COMMON, eta=c.strategy.server_lr), True),
    "fedmedian": StrategySpec(lambda c: FedMedian(**COMMON), False),
    "fedtrimmedavg": StrategySpec(
        lambda c: FedTrimmedAvg(**COMMON, beta=c.strategy.trim_beta), False
    ),
    "krum": StrategySpec(
        lambda c: Krum(**COMMON, num_malicious_nodes=c.strategy.num_malicious), False
    ),
    "multikrum": StrategySpec(
        lambda c: MultiKrum(**COMMON, num_malicious_nodes=c.strategy.num_malicious),
        False,
        per_round=_multikrum_select,
    ),
    "bulyan": StrategySpec(
        lambda c: Bulyan(**COMMON, num_malicious_nodes=c.strategy.num_malicious),
        False,
        min_updates=lambda c: 4 * c.strategy.num_malicious + 3,
    ),
}


class AggregationError(RuntimeError):
    """The strategy cannot be used as configured, or produced no usable model."""


class StandInGrid(Grid):
    """A Grid that is not connected to a SuperLink: every method refuses, so a subclass
    states exactly what it stands in for (and a strategy calling anything else fails)."""

    def get_node_ids(self) -> Iterable[int]:  # pragma: no cover
        raise NotImplementedError

    def set_run(self, run: object) -> None:  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self) -> object:  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(  # pragma: no cover
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise NotImplementedError


class _OneNodeGrid(StandInGrid):
    """What ``configure_train`` needs of a grid: one node to 'sample'."""

    def get_node_ids(self) -> Iterable[int]:
        return [1]


def strategy_spec(name: str) -> StrategySpec:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise AggregationError(
            f"unknown strategy.name '{name}': choose one of {sorted(STRATEGIES)}"
        ) from None


@contextmanager
def _quiet_flower() -> Iterator[None]:
    """Flower's strategies log per call ("Sampled 1 nodes (out of 1)" from the stand-in
    grid, "fraction_evaluate is 0"): true of their contract, misleading in our logs."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


class Aggregator:
    """A Flower strategy driven through its own contract, one round at a time."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.spec = strategy_spec(cfg.strategy.name)
        with _quiet_flower():
            self.strategy = self.spec.build(cfg)
        self.cfg = cfg
        self.reference: Arrays = {}
        """The current global model (shared part), set by ``configure`` each round."""
        self.clipped = 0
        """How many updates of the last ``aggregate`` were norm-bounded."""
        if cfg.simulation.preaggregate and not self.spec.weighted_mean:
            raise AggregationError(
                f"simulation.preaggregate = true sums updates on the workers, but "
                f"strategy.name = '{cfg.strategy.name}' needs every update (median, "
                "trimmed mean, Krum): set simulation.preaggregate = false"
            )

    def configure(self, round_: int, shared: Arrays) -> None:
        """Run the strategy's ``configure_train``; refuse config our devices ignore.

        ``shared`` is the current global model; ``aggregate`` bounds updates' distance
        from it (as Flower's FedOpt keeps its current arrays from ``configure_train``)."""
        self.reference = shared
        with _quiet_flower():
            record = to_record(shared)
            msgs = list(
                self.strategy.configure_train(round_, record, ConfigRecord(), _OneNodeGrid())
            )
        if not msgs:
            raise AggregationError(f"strategy '{self.cfg.strategy.name}' configured no training")
        sent = dict(msgs[0].content[self.strategy.configrecord_key])
        unknown = sorted(set(sent) - self.spec.sends)
        if unknown:
            raise AggregationError(
                f"strategy '{self.cfg.strategy.name}' sends {unknown} to devices, which "
                "hybridfl's devices do not implement"
            )
        mu = sent.get("proximal-mu")
        if mu is not None and float(mu) != self.cfg.client.proximal_mu:  # type: ignore[arg-type]
            raise AggregationError(
                f"strategy sends proximal-mu={mu}, devices train with client.proximal_mu="
                f"{self.cfg.client.proximal_mu}"
            )

    def aggregate(self, round_: int, updates: list[tuple[float, Arrays]]) -> Arrays:
        """The strategy's aggregate of ``(weight, arrays)`` updates, in the given order
        (each norm-bounded first when ``strategy.clip_norm`` is set)."""
        need = self.spec.min_updates(self.cfg)
        if len(updates) < need:
            raise AggregationError(
                f"round {round_}: strategy '{self.cfg.strategy.name}' needs at least {need} "
                f"updates (4 * strategy.num_malicious + 3 for bulyan), {len(updates)} were "
                "accepted: select more devices per round or lower strategy.num_malicious"
            )
        if self.spec.per_round is not None:
            self.spec.per_round(self.strategy, self.cfg, len(updates))
        bound = self.cfg.strategy.clip_norm
        self.clipped = 0
        if bound > 0:
            bounded = [(w, clip_to_norm(a, self.reference, bound)) for w, a in updates]
            self.clipped = sum(b is not a for (_, a), (_, b) in zip(updates, bounded, strict=True))
            if self.clipped:
                log.info(
                    "round %d: %d of %d updates norm-bounded", round_, self.clipped, len(updates)
                )
            updates = bounded
        replies = [
            Message(
                RecordDict(
                    {
                        ARRAYS_KEY: to_record(arrays),
                        "metrics": MetricRecord({WEIGHT_KEY: float(weight)}),
                    }
                ),
                dst_node_id=1,
                message_type="train",
            )
            for weight, arrays in updates
        ]
        with _quiet_flower():
            arrays, _ = self.strategy.aggregate_train(round_, replies)
        if arrays is None:
            raise AggregationError(f"round {round_}: the strategy produced no aggregate")
        return from_record(arrays)

    # -- state across rounds (checkpoints) ------------------------------------------
    def state(self) -> Arrays:
        """What the strategy carries from one round to the next, as named arrays.

        Flower keeps it in attributes: FedOpt's moments ``m_t``/``v_t`` (FedAdam,
        FedYogi, FedAdagrad; its ``current_arrays`` is reset from the global model in
        every ``configure_train``, so not saved), FedAvgM's ``current_arrays`` (set
        once, then its own aggregate: equal to the global model for float32 models,
        kept anyway since Flower owns it) and ``momentum_vector`` (a list in that
        record's key order). Names are ``<attribute>/<position>/<key>`` so order survives a
        round trip. The other strategies keep nothing.
        """
        out: Arrays = {}
        for attr in STATE_ATTRS:
            if attr == "current_arrays" and not isinstance(self.strategy, FedAvgM):
                continue  # FedOpt's: set from the global model by every configure_train
            value = getattr(self.strategy, attr, None)
            if isinstance(value, ArrayRecord):
                items = [(k, a.numpy()) for k, a in value.items()]
            elif isinstance(value, dict):
                items = list(value.items())
            elif isinstance(value, list):
                items = [("", v) for v in value]
            else:
                continue
            out.update({f"{attr}/{i:06d}/{k}": np.asarray(v) for i, (k, v) in enumerate(items)})
        return out

    def load_state(self, arrays: Arrays) -> None:
        """Put back what ``state`` returned (the strategy as it was after that round)."""
        grouped: dict[str, list[tuple[str, str, np.ndarray]]] = {}
        for name, v in arrays.items():
            attr, pos, key = name.split("/", 2)
            grouped.setdefault(attr, []).append((pos, key, v))
        for attr in STATE_ATTRS:
            if not hasattr(self.strategy, attr):
                continue
            items = [(k, v) for _, k, v in sorted(grouped.get(attr, []), key=lambda t: t[0])]
            if not items:
                setattr(self.strategy, attr, None)
            elif attr == "momentum_vector":
                setattr(self.strategy, attr, [v for _, v in items])
            elif attr == "current_arrays" and isinstance(self.strategy, FedAvgM):
                setattr(self.strategy, attr, ArrayRecord({k: Array(v) for k, v in items}))
            else:
                setattr(self.strategy, attr, dict(items))
        unknown = sorted(set(grouped) - set(STATE_ATTRS))
        if unknown:
            raise AggregationError(f"checkpoint holds strategy state {unknown} this build lacks")


STATE_ATTRS = ("current_arrays", "m_t", "v_t", "momentum_vector")
"""Attributes in which Flower's strategies keep state between rounds (see ``state``)."""


def clip_to_norm(update: Arrays, reference: Arrays, bound: float) -> Arrays:
    """``update`` moved toward ``reference`` so that their L2 distance (over every float
    array together) is at most ``bound``; the same object when it already is."""
    floats = [k for k in sorted(update) if update[k].dtype.kind == "f"]
    sq = sum(float(np.sum((update[k].astype(np.float64) - reference[k]) ** 2)) for k in floats)
    norm = math.sqrt(sq)
    if norm <= bound:
        return update
    f = bound / norm
    out = dict(update)
    for k in floats:
        ref = reference[k].astype(np.float64)
        out[k] = (ref + (update[k].astype(np.float64) - ref) * f).astype(update[k].dtype)
    return out


def partial_mean(sums: Arrays, weight_total: float) -> Arrays:
    """A worker's partial weighted sum as a weighted mean (its weight is ``weight_total``)."""
    return {k: (v / weight_total) for k, v in sums.items()} if weight_total > 0 else {}


__all__ = ["STRATEGIES", "AggregationError", "Aggregator", "clip_to_norm", "partial_mean"]
