"""The serving plane: which global version each device serves, and how a new one gets there.

The training plane moves every round (the newest aggregate); the serving plane moves
only here. A *candidate* (the newest published version newer than ``serving``) is
given to a seeded share of devices (``canary``), measured next to the serving
version without being served (``shadow``), or held at a fixed share (``ab``). Each
round of a step, the candidate and the serving version are evaluated on the *same*
devices' test data; a step passes after ``window`` measurements with at most
``failure_limit`` failed ones, and the last step promotes (``serving`` moves, actor
``policy:<name>``). One failure too many aborts: the candidate is rejected (an event
with the numbers) and its devices go back to the serving version.

Shape after Flower's strategies: ``Policy`` has one method per decision (share of a
step, what follows a passed step); a variant overrides one of them. ``Rollout``
drives a policy from the round loop through one call, ``after_round``.

A human wins: a move of ``serving`` by a human (the token-gated PUT) during a
rollout cancels it; a human *pin* holds the policy (it starts nothing) until a
human releases it with ``{"pinned": false}``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from common.config import ExperimentConfig
from common.config_rollout import RolloutConfig
from common.rows import Distribution, RoundRow, ServingRow
from common.rows_serving import VersionCount
from common.rundir import REGISTRY_DIR
from common.seeding import derive_seed
from common.weights import Arrays
from server.monitor import DropDetector
from server.population import Population
from server.registry import Analysis, Registry, RegistryError
from server.rollout_state import RolloutState, write_state

log = logging.getLogger("hybridfl.rollout")

Measure = Callable[[int, Arrays, list[int]], dict[int, tuple[float, float]]]
"""(round, weights, devices) -> {device: (accuracy, loss)} on each device's test split."""
Decision = Literal["start", "step", "promote", "abort", "cancel"]


# ------------------------------------------------------------------ assignment
def assignment_order(seed: int, version: int, ids: np.ndarray) -> np.ndarray:
    """Devices in the order they join ``version``'s rollout: a permutation seeded by
    (seed, version). A step takes a prefix, so a device on the candidate at one step
    stays on it at every later one."""
    rng = np.random.default_rng(derive_seed(seed, "rollout", version))
    return rng.permutation(np.sort(np.asarray(ids, dtype=np.int64)))


def share_count(share: float, n: int) -> int:
    """Devices at ``share`` of ``n``: rounded up, so a small step still has one."""
    return min(n, math.ceil(share * n - 1e-9))


def on_candidate(order: np.ndarray, share: float) -> set[int]:
    return {int(d) for d in order[: share_count(share, order.size)]}


# -------------------------------------------------------------------- analysis
def analyse(
    cfg: RolloutConfig,
    candidate: dict[int, tuple[float, float]],
    serving: dict[int, tuple[float, float]],
    *,
    share: float,
    failures: int,
) -> Analysis:
    """One measurement: candidate vs serving on the devices measured with both."""
    both = sorted(set(candidate) & set(serving))
    if not both:
        return Analysis(
            devices=0,
            candidate_acc=0.0,
            serving_acc=0.0,
            candidate_loss=0.0,
            serving_loss=0.0,
            share_hurt=0.0,
            passed=False,
            failures=failures + 1,
            share=share,
        )
    c = np.array([candidate[d] for d in both], dtype=np.float64)
    s = np.array([serving[d] for d in both], dtype=np.float64)
    if cfg.metric == "accuracy":
        hurt = c[:, 0] < s[:, 0] - cfg.hurt_margin
        good = c[:, 0].mean() >= s[:, 0].mean() - cfg.tolerance
    else:
        hurt = c[:, 1] > s[:, 1] + cfg.hurt_margin
        good = c[:, 1].mean() <= s[:, 1].mean() + cfg.tolerance
    share_hurt = float(hurt.mean())
    passed = bool(good and share_hurt <= cfg.max_share_hurt)
    return Analysis(
        devices=len(both),
        candidate_acc=float(c[:, 0].mean()),
        serving_acc=float(s[:, 0].mean()),
        candidate_loss=float(c[:, 1].mean()),
        serving_loss=float(s[:, 1].mean()),
        share_hurt=share_hurt,
        passed=passed,
        failures=failures + (not passed),
        share=share,
    )


# --------------------------------------------------------------------- policies
class Policy:
    """Canary: growing shares, the candidate served to each step's devices."""

    name = "canary"
    serves_candidate = True

    def __init__(self, cfg: RolloutConfig) -> None:
        self.cfg = cfg

    def steps(self) -> list[float]:
        return list(self.cfg.steps)

    def after_pass(self, step: int) -> Literal["next", "promote", "hold"]:
        return "promote" if step + 1 >= len(self.steps()) else "next"


class Shadow(Policy):
    """Measured on the step's devices next to the serving version, never served."""

    name = "shadow"
    serves_candidate = False


class AB(Policy):
    """Two versions at a fixed share, measured every window; never promoted by itself."""

    name = "ab"

    def steps(self) -> list[float]:
        return [self.cfg.ab_share]

    def after_pass(self, step: int) -> Literal["next", "promote", "hold"]:
        return "hold"


POLICIES: dict[str, type[Policy]] = {"canary": Policy, "shadow": Shadow, "ab": AB}


# ------------------------------------------------------------------- controller
class Rollout:
    """Drives one policy over the run's registry, one ``after_round`` per round."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        registry_root: Path,
        measure: Measure,
        population_ids: Callable[[], np.ndarray],
        analysis_cap: int,
    ) -> None:
        self.cfg = cfg.rollout
        self.seed = cfg.seed
        self.policy = POLICIES[self.cfg.policy](self.cfg)
        self.actor = f"policy:{self.policy.name}"
        self.registry = Registry(registry_root)
        self.measure = measure
        self.population_ids = population_ids
        self.analysis_cap = analysis_cap
        self.state = RolloutState(policy=self.policy.name, steps=self.policy.steps())
        self.order = np.empty(0, dtype=np.int64)
        self.started_after_seq = 0
        self._arrays: dict[int, Arrays] = {}
        self._ids = np.empty(0, dtype=np.int64)
        """All device ids, read once per round."""
        w = self.cfg.monitor_window
        self.detector = DropDetector(w, self.cfg.monitor_drop) if w else None

    # -- per round ---------------------------------------------------------------
    def after_round(self, round_: int, row: RoundRow, evaluated: list[int]) -> RoundRow:
        """Measure, decide, and add the round's serving-plane fields to ``row``.

        ``evaluated``: the devices the evaluator measured this round (their served
        accuracy is reported when ``row.evaluated``)."""
        st = self.state
        st.round = round_
        self._ids = self.population_ids()
        try:
            serving = self.registry.alias("serving")
        except RegistryError as exc:  # a damaged alias file: an operator's to fix
            log.error("rollout paused this round: %s", exc)
            return row
        if serving is None:  # nothing published (a loop without a registry)
            return row
        decision = self._respect_humans(serving.version)
        st.serving_version = serving.version
        if st.phase == "idle" and decision is None:
            decision = self._maybe_start(round_, serving.version)
        ids = sorted(set(evaluated)) if row.evaluated else []
        analysis_devices: list[int] = []
        if st.active:
            k = min(share_count(st.share, self.order.size), self.analysis_cap)
            analysis_devices = sorted(int(d) for d in self.order[:k])  # a seeded sample
        cand_set = self._served_candidate_set()
        serving_scores = self._measure(round_, serving.version, sorted({*ids, *analysis_devices}))
        cand_scores: dict[int, tuple[float, float]] = {}
        served = ServingRow(
            policy=self.policy.name,
            serving_version=serving.version,
            candidate_version=st.candidate_version,
            candidate_share=len(cand_set) / max(int(self.order.size), 1) if cand_set else 0.0,
        )
        if st.active:
            assert st.candidate_version is not None
            want = sorted({*analysis_devices, *(d for d in ids if d in cand_set)})
            cand_scores = self._measure(round_, st.candidate_version, want)
            decision = (
                self._decide(round_, cand_scores, serving_scores, analysis_devices) or decision
            )
            served.analysis = st.last_analysis
        served.decision = decision
        served.served_versions = self._counts(serving.version, served.candidate_version, cand_set)
        accs = [
            scores[d][0]
            for d in ids
            if d in (scores := cand_scores if d in cand_set else serving_scores)
        ]
        served.served_acc = Distribution.of(accs) if accs else None
        if self.detector is not None and served.served_acc is not None:
            fired = self.detector.update(served.served_acc.mean)
            if fired is not None:
                served.alert = self._alert(round_, *fired)
        write_state(self.registry.root, st)
        return row.model_copy(update={"serving": served})

    # -- steps of after_round ------------------------------------------------------
    def _respect_humans(self, serving_version: int) -> Decision | None:
        """A human's move of ``serving`` cancels the rollout; a human pin holds the policy."""
        st = self.state
        last = self.registry.event_log.last("serving", "move")
        if last is None or last.actor != "human":
            if st.phase == "held":
                st.phase, st.note = "idle", "released"
            return None
        decision: Decision | None = None
        if st.active and last.seq > self.started_after_seq:
            st.note = (
                f"cancelled: a human moved serving to v{last.to_version} (event #{last.seq}); "
                f"candidate v{st.candidate_version} dropped"
            )
            self._end()
            decision = "cancel"
        if last.pinned:
            st.phase = "held"
            st.note = (
                f"held: a human pinned serving at v{serving_version} (event #{last.seq}); "
                'PUT {"pinned": false} hands serving back to the policy'
            )
        elif st.phase == "held":
            st.phase, st.note = "idle", f"released by a human (event #{last.seq})"
        return decision

    def _maybe_start(self, round_: int, serving_version: int) -> Decision | None:
        st = self.state
        numbers = self.registry.version_numbers()
        newer = [v for v in numbers if v > serving_version and v not in st.rejected]
        if not newer:
            return None
        candidate = newer[-1]
        if self._ids.size == 0:
            return None
        self.order = assignment_order(self.seed, candidate, self._ids)
        last = self.registry.event_log.last()
        self.started_after_seq = last.seq if last is not None else 0
        st.phase, st.candidate_version, st.step = "analysing", candidate, 0
        st.share = self.policy.steps()[0]
        st.serves_candidate = self.policy.serves_candidate
        st.measurements = st.failures = 0
        st.note = f"v{candidate} from round {round_}"
        log.info("rollout %s: candidate v%d at share %.2f", self.actor, candidate, st.share)
        return "start"

    def _served_candidate_set(self) -> set[int]:
        st = self.state
        if not (st.active and st.serves_candidate):
            return set()
        return on_candidate(self.order, st.share)

    def _decide(
        self,
        round_: int,
        cand: dict[int, tuple[float, float]],
        serv: dict[int, tuple[float, float]],
        devices: list[int],
    ) -> Decision | None:
        st = self.state
        assert st.candidate_version is not None and st.serving_version is not None
        result = analyse(
            self.cfg,
            {d: cand[d] for d in devices if d in cand},
            {d: serv[d] for d in devices if d in serv},
            share=st.share,
            failures=st.failures,
        )
        st.last_analysis, st.failures = result, result.failures
        st.measurements += 1
        candidate, step = st.candidate_version, st.step
        if st.failures > self.cfg.failure_limit:
            self.registry.record(
                "reject",
                "serving",
                st.serving_version,
                from_version=candidate,
                actor=self.actor,
                reason=(
                    f"v{candidate} failed {st.failures} measurement(s) at step {step + 1} "
                    f"(limit {self.cfg.failure_limit}); its devices go back to "
                    f"v{st.serving_version}"
                ),
                round=round_,
                analysis=result,
            )
            st.rejected.append(candidate)
            st.note = f"aborted: v{candidate} rejected at step {step + 1}"
            self._end()
            return "abort"
        if st.measurements < self.cfg.window:
            return None
        after = self.policy.after_pass(step)
        if after == "next":
            st.step += 1
            st.share = self.policy.steps()[st.step]
            st.measurements = st.failures = 0
            return "step"
        if after == "hold":
            st.measurements = st.failures = 0
            return None
        self.registry.set_alias(
            "serving",
            candidate,
            pinned=True,  # at this version: False would mean "follow latest"
            actor=self.actor,
            reason=f"v{candidate} passed {len(self.policy.steps())} step(s)",
            round=round_,
            analysis=result,
        )
        st.serving_version = candidate
        st.note = f"promoted v{candidate} in round {round_}"
        self._end()
        return "promote"

    def _alert(self, round_: int, mean: float, baseline: float) -> str:
        """Record the monitor's alert; roll back a promotion made within the window."""
        st, w = self.state, self.cfg.monitor_window
        reason = (
            f"served accuracy: mean of the last {w} evaluated rounds {mean:.3f}, "
            f"{baseline - mean:.3f} below the best {baseline:.3f}"
        )
        last = self.registry.event_log.last("serving", "move")
        recent = (
            last is not None
            and last.actor == self.actor
            and last.round is not None
            and last.from_version is not None
            and round_ - last.round < w
        )
        if self.cfg.monitor_action == "rollback" and recent:
            assert last is not None and last.from_version is not None
            if st.active:
                self._end()
            self.registry.set_alias(
                "serving",
                last.from_version,
                actor="monitor",
                reason=f"{reason}; v{last.to_version} was promoted in round {last.round}",
                round=round_,
            )
            st.rejected.append(last.to_version)
            st.serving_version = last.from_version
            st.note = f"monitor rolled back v{last.to_version} in round {round_}"
            return "rollback"
        if not recent:
            reason += "; no promotion within the window: the data changed, not the version"
        self.registry.record(
            "alert",
            "serving",
            st.serving_version or 0,
            actor="monitor",
            reason=reason,
            round=round_,
        )
        return "alert"

    def _end(self) -> None:
        st = self.state
        st.phase, st.candidate_version, st.share = "idle", None, 0.0
        st.measurements = st.failures = st.step = 0
        self._arrays = {k: v for k, v in self._arrays.items() if k == st.serving_version}

    # -- measurement ---------------------------------------------------------------
    def _measure(
        self, round_: int, version: int, devices: list[int]
    ) -> dict[int, tuple[float, float]]:
        if not devices:
            return {}
        arrays = self._arrays.get(version)
        if arrays is None:
            try:
                arrays = self.registry.load_arrays(version)
            except RegistryError as exc:
                log.error("rollout: cannot load v%d: %s", version, exc)
                return {}
            self._arrays[version] = arrays
        return self.measure(round_, arrays, devices)

    def _counts(
        self, serving: int, candidate: int | None, cand_set: set[int]
    ) -> list[VersionCount]:
        n = int(self._ids.size)
        counts = [VersionCount(version=serving, devices=n - len(cand_set))]
        if cand_set and candidate is not None:
            counts.append(VersionCount(version=candidate, devices=len(cand_set)))
        return [c for c in counts if c.devices > 0]


def rollout_for(
    cfg: ExperimentConfig, run_dir: Path, measure: Measure, population: Population
) -> Rollout | None:
    """The run's rollout controller; None under ``immediate`` (every version is served
    as soon as it is published, and the metrics rows keep their old fields only)."""
    if cfg.rollout.policy == "immediate":
        return None

    def ids() -> np.ndarray:
        return np.union1d(population.train_pool(), population.holdout())

    return Rollout(cfg, run_dir / REGISTRY_DIR, measure, ids, cfg.evaluation.sample_devices)
