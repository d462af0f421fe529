"""Personalization algorithms' defining properties, on real models and real SGD steps.

FedRep (head personal, trained in phases), FedBN (batch-norm layers personal),
Ditto (a personal model pulled toward the global one), APFL (a learned mixture),
plus a two-round smoke of every registered algorithm through the on-disk state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from client.algorithms import ALGORITHMS, get_algorithm
from client.algorithms.apfl import ALPHA_KEY
from client.algorithms.fedrep import FedRep
from client.algorithms.loop import DeviceData, evaluate, trainable_only
from client.state import PersonalState, PersonalStateStore
from common.models import ModelSpec, build_model
from common.personalization import batchnorm_keys, shared_keys
from common.protocol import RoundInstructions
from common.weights import Arrays, model_to_arrays
from tests.tasks import make_task

MLP = ModelSpec(name="mlp2nn", input_shape=(1, 8, 8), num_classes=10, hidden=16)
BN_CNN = ModelSpec(name="cnn", input_shape=(1, 8, 8), num_classes=10, batch_norm=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models: one thread, as a device's ClientApp runs (threads only contend here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(seed: int = 0, n: int = 40, scale: float = 1.0, shift: float = 0.0) -> DeviceData:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g) * scale + shift
    y = torch.randint(0, 10, (n,), generator=g)
    return DeviceData(x, y, x[:10], y[:10])


def _instr(algorithm: str, spec: ModelSpec = MLP, **kw: float) -> RoundInstructions:
    kw.setdefault("lr", 0.1)
    return make_task(algorithm, spec, **kw)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _changed(a: Arrays, b: Arrays, keys: set[str]) -> set[str]:
    return {k for k in keys if not np.array_equal(a[k], b[k])}


def _distance(a: Arrays, b: Arrays, keys: set[str]) -> float:
    return math.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in keys))


# -- the loop hook -------------------------------------------------------------------


def test_trainable_only_freezes_the_rest_and_restores() -> None:
    model = build_model(MLP, seed=0)
    model.body[1].bias.requires_grad_(False)  # already frozen by the caller: stays so
    with trainable_only(model, {"head.weight", "body.1.bias"}) as params:
        assert [p.shape for p in params] == [model.head.weight.shape]
        grads = {n for n, p in model.named_parameters() if p.requires_grad}
        assert grads == {"head.weight"}
    assert not model.body[1].bias.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "body.1.bias")
    with pytest.raises(ValueError, match="no trainable parameter"), trainable_only(model, {"x"}):
        pass
    assert model.head.weight.requires_grad


# -- FedRep --------------------------------------------------------------------------


class _PhaseRecorder(FedRep):
    """FedRep that snapshots the model around each training phase (the observable hook)."""

    def __init__(self) -> None:
        self.phases: list[tuple[set[str], Arrays, Arrays]] = []

    def local_train(self, model: nn.Module, *args: object, **kw: object) -> tuple[float, int]:
        before = model_to_arrays(model)
        out = super().local_train(model, *args, **kw)  # type: ignore[arg-type]
        self.phases.append((set(kw["keys"]), before, model_to_arrays(model)))  # type: ignore[call-overload]
        return out


def test_fedrep_trains_head_then_body_each_with_the_other_frozen() -> None:
    algo = _PhaseRecorder()
    model = build_model(MLP, seed=0)
    g = model_to_arrays(model)
    head, body = algo.personal_keys(model), algo.shared_keys(model)
    assert head == {"head.weight", "head.bias"} and body and not head & body
    upd = algo.client_update(model, g, None, _data(), _instr("fedrep", head_epochs=2), _gen())
    (k1, b1, a1), (k2, b2, a2) = algo.phases
    assert k1 == head and k2 == body
    assert _changed(b1, a1, head | body) == head  # head phase: the body does not move
    assert _changed(b2, a2, head | body) == body  # body phase: the head does not move
    # Phases chain, the update is the trained body, the state the trained head.
    assert _changed(a1, b2, head | body) == set()
    assert set(upd.shared) == body
    for k in body:
        np.testing.assert_array_equal(upd.shared[k], a2[k])
    for k in head:
        np.testing.assert_array_equal(upd.state.arrays[k], a2[k])
    # head_epochs=2 then local_epochs=1 over 40 samples in batches of 10.
    assert upd.metrics["steps"] == 3 * 4
    assert all(p.requires_grad for p in model.parameters())


def test_fedrep_never_sends_the_head_and_resumes_from_its_own() -> None:
    algo = get_algorithm("fedrep")
    model = build_model(MLP, seed=0)
    g = model_to_arrays(model)
    upd = algo.client_update(model, g, None, _data(), _instr("fedrep"), _gen())
    assert upd.shared and not any(k.startswith("head.") for k in upd.shared)
    assert set(upd.state.arrays) == {"head.weight", "head.bias"}
    # Next round: the head phase starts from the device's head, not the served one.
    recorder = _PhaseRecorder()
    recorder.client_update(model, g, upd.state, _data(), _instr("fedrep"), _gen(1))
    start = recorder.phases[0][1]
    for k in upd.state.arrays:
        np.testing.assert_array_equal(start[k], upd.state.arrays[k])
    for k in upd.shared:
        np.testing.assert_array_equal(start[k], g[k])
    algo.load_personalized(model, g, upd.state)
    now = model_to_arrays(model)
    np.testing.assert_array_equal(now["head.weight"], upd.state.arrays["head.weight"])
    np.testing.assert_array_equal(now["body.1.weight"], g["body.1.weight"])


# -- FedBN ---------------------------------------------------------------------------


def test_cnn_batch_norm_layers_sit_in_the_body() -> None:
    keys = set(build_model(BN_CNN, seed=0).state_dict())
    bn = batchnorm_keys(keys)
    assert {"body.1.running_mean", "body.1.weight", "body.5.running_var"} <= bn
    assert {"body.1.num_batches_tracked", "body.5.num_batches_tracked"} <= bn
    assert len(bn) == 10 and all(k.startswith("body.") for k in bn)
    plain = set(build_model(BN_CNN.model_copy(update={"batch_norm": False})).state_dict())
    assert batchnorm_keys(plain) == set()


def test_fedbn_never_sends_batch_norm_and_keeps_it_per_device() -> None:
    algo = get_algorithm("fedbn")
    model = build_model(BN_CNN, seed=0)
    g = model_to_arrays(model)
    bn = batchnorm_keys(g)
    instr = _instr("fedbn", BN_CNN)
    # Two devices whose features differ (a scanner that is brighter and noisier).
    a = algo.client_update(model, g, None, _data(0), instr, _gen())
    b = algo.client_update(model, g, None, _data(1, scale=3.0, shift=1.0), instr, _gen())
    for upd in (a, b):
        assert set(upd.shared) == set(g) - bn
        assert not any(k.endswith(("running_mean", "running_var")) for k in upd.shared)
        assert set(upd.state.arrays) == bn
    for stat in ("body.1.running_mean", "body.1.running_var", "body.5.running_mean"):
        assert not np.allclose(a.state.arrays[stat], b.state.arrays[stat])
        assert not np.allclose(a.state.arrays[stat], g[stat])
    # The personalized model: shared layers from the server, BN layers from the device.
    algo.load_personalized(model, g, a.state)
    now = model_to_arrays(model)
    for k in g:
        np.testing.assert_array_equal(now[k], a.state.arrays[k] if k in bn else g[k])


# -- Ditto ---------------------------------------------------------------------------


def test_ditto_personal_model_moves_toward_global_as_lambda_grows() -> None:
    model = build_model(MLP, seed=0)
    g = model_to_arrays(model)
    params = {n for n, _ in model.named_parameters()}
    dist, sent = [], []
    for lam in (0.0, 0.1, 1.0, 10.0):
        instr = _instr("ditto", ditto_lambda=lam, local_epochs=3, lr=0.05)
        upd = get_algorithm("ditto").client_update(model, g, None, _data(), instr, _gen())
        assert set(upd.state.arrays) == set(g)  # v is a whole model
        dist.append(_distance(upd.state.arrays, g, params))
        sent.append(upd.shared)
    assert all(later < earlier for earlier, later in pairwise(dist)), dist
    assert dist[0] > 0
    # lambda shapes v only: the global update (w, trained as FedAvg) is the same for all.
    for other in sent[1:]:
        for k in g:
            np.testing.assert_array_equal(other[k], sent[0][k])


def test_ditto_keeps_v_across_rounds_and_serves_it() -> None:
    algo = get_algorithm("ditto")
    model = build_model(MLP, seed=0)
    g = model_to_arrays(model)
    instr = _instr("ditto", ditto_lambda=0.0)
    first = algo.client_update(model, g, None, _data(), instr, _gen())
    again = algo.client_update(model, g, None, _data(), instr, _gen())
    second = algo.client_update(model, g, first.state, _data(), instr, _gen())
    # Round 2 continues from v (lambda = 0: plain local training), not from w.
    params = {n for n, _ in model.named_parameters()}
    assert _distance(second.state.arrays, g, params) > _distance(again.state.arrays, g, params)
    assert second.state.meta["rounds_trained"] == 2
    algo.load_personalized(model, g, second.state)
    now = model_to_arrays(model)
    for k in g:
        np.testing.assert_array_equal(now[k], second.state.arrays[k])


# -- APFL ----------------------------------------------------------------------------


def test_apfl_alpha_stays_in_unit_interval_even_with_a_huge_lr() -> None:
    algo = get_algorithm("apfl")
    model = build_model(MLP, seed=0)
    g = model_to_arrays(model)
    state: PersonalState | None = None
    alphas = []
    for r in range(3):
        instr = _instr("apfl", apfl_alpha=0.5, apfl_alpha_lr=1e6)
        upd = algo.client_update(model, g, state, _data(r), instr, _gen(r))
        state = upd.state
        alphas.append(float(state.meta[ALPHA_KEY]))
        assert upd.metrics["apfl_alpha"] == alphas[-1]
    assert all(0.0 <= a <= 1.0 for a in alphas), alphas
    assert any(a != 0.5 for a in alphas)
    # A zero alpha lr leaves alpha where the server put it (up to float32).
    upd = algo.client_update(
        model, g, None, _data(), _instr("apfl", apfl_alpha=0.3, apfl_alpha_lr=0.0), _gen()
    )
    assert upd.state.meta[ALPHA_KEY] == pytest.approx(0.3, rel=1e-7)


def test_apfl_sends_w_trained_on_its_own_loss_only() -> None:
    """The sent w is FedAvg's update: v and alpha never leak into w's gradient."""
    model = build_model(MLP, seed=0)
    g = model_to_arrays(model)
    apfl = get_algorithm("apfl").client_update(
        model, g, None, _data(), _instr("apfl", apfl_alpha_lr=0.5), _gen(4)
    )
    fedavg = get_algorithm("fedavg").client_update(
        model, g, None, _data(), _instr("fedavg"), _gen(4)
    )
    assert set(apfl.shared) == set(g)
    for k in g:
        np.testing.assert_allclose(apfl.shared[k], fedavg.shared[k], rtol=1e-5, atol=1e-7)
    # ...while v did train on the mixed loss.
    assert _changed(apfl.state.arrays, g, set(g))


def test_apfl_personalized_model_is_the_mixture_with_the_current_global() -> None:
    algo = get_algorithm("apfl")
    model = build_model(MLP, seed=0)
    g = model_to_arrays(model)
    instr = _instr("apfl", apfl_alpha=0.6, apfl_alpha_lr=0.1)
    upd = algo.client_update(model, g, None, _data(), instr, _gen())
    alpha, v = float(upd.state.meta[ALPHA_KEY]), upd.state.arrays
    assert 0.0 < alpha < 1.0 and alpha != 0.6
    new_global = upd.shared  # say the server's next version is this device's w
    algo.load_personalized(model, new_global, upd.state)
    now = model_to_arrays(model)
    for k in g:
        np.testing.assert_allclose(
            now[k], alpha * v[k] + (1 - alpha) * new_global[k], rtol=1e-6, atol=1e-7
        )
    # No personal state yet: the personalized model is the global one.
    algo.load_personalized(model, g, None)
    for k, arr in model_to_arrays(model).items():
        np.testing.assert_array_equal(arr, g[k])


# -- every algorithm, two rounds through the on-disk state ---------------------------


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_two_rounds_and_a_personalized_model(name: str, tmp_path: Path) -> None:
    spec = BN_CNN if name == "fedbn" else MLP
    algo = get_algorithm(name)
    store = PersonalStateStore(tmp_path)
    model = build_model(spec, seed=0)
    g = model_to_arrays(model)
    expected = shared_keys(name, g)
    data = _data()
    for r in (1, 2):
        instr = _instr(name, spec, proximal_mu=0.01 if name == "fedprox" else 0.0, ditto_lambda=0.1)
        received = g
        upd = algo.client_update(model, g, store.load(7), data, instr, _gen(r))
        assert set(upd.shared) == expected
        assert all(np.isfinite(v).all() for v in upd.shared.values())
        assert all(math.isfinite(v) for v in upd.metrics.values()) and upd.metrics["steps"] > 0
        store.save(7, upd.state)  # arrays + JSON scalars: must survive the disk
        g = upd.shared | {k: v for k, v in g.items() if k not in expected}
    state = store.load(7)
    assert state is not None and state.meta["rounds_trained"] == 2
    # The personalized model from the state on disk is the one from the state in memory...
    algo.load_personalized(model, received, state)
    from_disk = model_to_arrays(model)
    algo.load_personalized(model, received, upd.state)
    for k, v in model_to_arrays(model).items():
        np.testing.assert_array_equal(from_disk[k], v, err_msg=k)
    # ... and not the served model: every algorithm personalizes something.
    assert any(not np.array_equal(from_disk[k], received[k]) for k in received)
    loss, _ = evaluate(model, data.x_test, data.y_test, 16)
    assert math.isfinite(loss)
