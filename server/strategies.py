"""Flower strategies by name, from the typed config.

hybridfl does its own device sampling (seeded, in device-id order) and uses the
strategy for what it is best at: turning a set of validated replies into the
next global weights.
"""

from __future__ import annotations

import numpy as np
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg
from flwr.serverapp.strategy.fedopt import FedOpt

from common.config import StrategyConfig

WEIGHT_KEY = "num-examples"


def make_strategy(cfg: StrategyConfig) -> FedAvg:
    common = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
        "weighted_by_key": WEIGHT_KEY,
    }
    if cfg.name == "fedavg":
        return FedAvg(**common)
    if cfg.name == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    if cfg.name == "fedadam":
        return FedAdam(**common, eta=cfg.server_lr)
    if cfg.name == "fedmedian":
        return FedMedian(**common)
    if cfg.name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=cfg.trim_beta)
    raise ValueError(f"unknown strategy.name '{cfg.name}'")


def prepare_round(strategy: FedAvg, shared: dict[str, np.ndarray]) -> dict[str, float]:
    """Give the strategy what its ``configure_train`` would have set; return the
    extra per-round config it would have sent (e.g. FedProx's ``proximal-mu``).

    We do not call ``configure_train`` because it samples nodes with an unseeded
    RNG; we need seeded, device-id-ordered sampling for reproducible runs.
    """
    extra: dict[str, float] = {}
    if isinstance(strategy, FedOpt):
        # FedAdam & co. compute the pseudo-gradient against the weights we sent;
        # only the shared keys ever come back (FedPer keeps heads on the device).
        strategy.current_arrays = {k: np.array(v, copy=True) for k, v in shared.items()}
    if isinstance(strategy, FedProx):
        extra["proximal-mu"] = float(strategy.proximal_mu)
    return extra
