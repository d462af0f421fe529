"""Each algorithm's defining property, on a real model and real training steps."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from client.algorithms import ALGORITHMS, get_algorithm
from client.algorithms.loop import DeviceData, proximal_term
from common.models import ModelSpec, build_model
from common.personalization import shared_keys
from common.protocol import RoundInstructions
from common.weights import load_arrays, model_to_arrays
from tests.tasks import make_task

SPEC = ModelSpec(name="mlp2nn", input_shape=(1, 8, 8), num_classes=10, hidden=16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models: one thread, as a device's ClientApp runs (threads only contend here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(seed: int = 0, n: int = 40) -> DeviceData:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DeviceData(x, y, x[:10], y[:10])


def _instr(algorithm: str, spec: ModelSpec = SPEC, **kw: float) -> RoundInstructions:
    kw.setdefault("lr", 0.1)
    return make_task(algorithm, spec, **kw)


def test_fedavg_sends_everything_and_keeps_its_trained_copy() -> None:
    model = build_model(SPEC, seed=0)
    global_arrays = model_to_arrays(model)
    upd = get_algorithm("fedavg").client_update(
        model, global_arrays, None, _data(), _instr("fedavg"), torch.Generator().manual_seed(0)
    )
    assert set(upd.shared) == set(global_arrays)
    assert set(upd.state.arrays) == set(global_arrays)
    assert any(not np.array_equal(upd.shared[k], global_arrays[k]) for k in global_arrays)
    for k in upd.shared:
        np.testing.assert_array_equal(upd.shared[k], upd.state.arrays[k])


def test_fedper_never_sends_the_head_and_keeps_it() -> None:
    algo = get_algorithm("fedper")
    model = build_model(SPEC, seed=0)
    global_arrays = model_to_arrays(model)
    upd = algo.client_update(
        model, global_arrays, None, _data(), _instr("fedper"), torch.Generator().manual_seed(0)
    )
    assert upd.shared and not any(k.startswith("head.") for k in upd.shared)
    assert set(upd.state.arrays) == {"head.weight", "head.bias"}
    # Next round starts from the device's own head, not the served one.
    upd2 = algo.client_update(
        model, global_arrays, upd.state, _data(), _instr("fedper"), torch.Generator().manual_seed(1)
    )
    assert not any(k.startswith("head.") for k in upd2.shared)
    # The personalized model is the global body under the personal head.
    algo.load_personalized(model, global_arrays, upd2.state)
    now = model_to_arrays(model)
    np.testing.assert_array_equal(now["head.weight"], upd2.state.arrays["head.weight"])
    np.testing.assert_array_equal(now["body.1.weight"], global_arrays["body.1.weight"])


def test_same_generator_same_update() -> None:
    model = build_model(SPEC, seed=0)
    g = model_to_arrays(model)
    a = get_algorithm("fedavg").client_update(
        model, g, None, _data(), _instr("fedavg"), torch.Generator().manual_seed(5)
    )
    b = get_algorithm("fedavg").client_update(
        model, g, None, _data(), _instr("fedavg"), torch.Generator().manual_seed(5)
    )
    for k in a.shared:
        np.testing.assert_array_equal(a.shared[k], b.shared[k])


def test_proximal_gradient_is_mu_times_distance() -> None:
    model = build_model(SPEC, seed=0)
    ref = {k: v.detach().clone() + 0.5 for k, v in model.named_parameters()}
    mu = 0.3
    loss = proximal_term(ref, mu)(model)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(p.grad, mu * (p.detach() - ref[name]))


def test_proximal_term_keeps_update_near_global() -> None:
    model = build_model(SPEC, seed=0)
    g = model_to_arrays(model)

    def drift(mu: float) -> float:
        upd = get_algorithm("fedprox").client_update(
            model,
            g,
            None,
            _data(),
            _instr("fedprox", proximal_mu=mu),
            torch.Generator().manual_seed(0),
        )
        return sum(float(np.sum((upd.shared[k] - g[k]) ** 2)) for k in g)

    assert drift(10.0) < drift(0.0)


def test_registry_matches_the_config_schema() -> None:
    from typing import get_args

    from common.config import AlgorithmName

    assert set(ALGORITHMS) == set(get_args(AlgorithmName))
    for name, cls in ALGORITHMS.items():
        assert cls.spec.name == name and cls.__module__ == f"client.algorithms.{name}"


BN_SPEC = ModelSpec(name="cnn", input_shape=(1, 8, 8), num_classes=10, batch_norm=True)


def _expected_personal(name: str, model: torch.nn.Module) -> set[str]:
    """What each algorithm's paper keeps on the device, spelled out from the model's own
    layers (not from common.personalization, whose answer is under test)."""
    if name in ("fedper", "fedrep"):
        return {f"head.{k}" for k in model.head.state_dict()}  # type: ignore[union-attr]
    if name == "fedbn":
        bn = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
        return {
            f"{m}.{k}"
            for m, mod in model.named_modules()
            if isinstance(mod, bn)
            for k in mod.state_dict()
        }
    return set()  # fedavg, fedprox, ditto, apfl send the whole model


@pytest.mark.parametrize("spec", [SPEC, BN_SPEC], ids=["mlp", "cnn-bn"])
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_device_and_server_agree_on_shared_keys(name: str, spec: ModelSpec) -> None:
    """The server validates updates against common.personalization: the device must match,
    and both must keep exactly what the algorithm keeps."""
    model = build_model(spec, seed=0)
    algo = get_algorithm(name)
    keys = model.state_dict()
    personal = _expected_personal(name, model)
    if name == "fedbn" and spec is BN_SPEC:
        assert personal  # the check below is not vacuous
    assert shared_keys(name, keys) == set(keys) - personal  # the server's answer
    upd = algo.client_update(
        model,
        model_to_arrays(model),
        None,
        _data(),
        _instr(name, spec),
        torch.Generator().manual_seed(0),
    )
    assert set(upd.shared) == set(keys) - personal  # what the device really sends
    assert personal <= set(upd.state.arrays)  # ... and what it keeps


def test_fedprox_update_carries_mu_times_the_distance() -> None:
    """Two full-batch SGD steps: the proximal term adds exactly lr*mu*(w1 - w_global) at step 2.

    Step 1 starts at the global model (zero distance); after it the only difference
    between mu > 0 and mu = 0 is the proximal gradient mu*(w1 - w_global).
    """
    model = build_model(SPEC, seed=0)
    g = model_to_arrays(model)
    data, lr, mu = _data(n=20), 0.1, 0.7

    def update(epochs: int, mu: float) -> dict[str, np.ndarray]:
        instr = _instr("fedprox", proximal_mu=mu, local_epochs=epochs, batch_size=20)
        gen = torch.Generator().manual_seed(3)
        return get_algorithm("fedprox").client_update(model, g, None, data, instr, gen).shared

    w1, w2_plain, w2_prox = update(1, 0.0), update(2, 0.0), update(2, mu)
    assert w1.keys() == g.keys()
    for k in g:
        np.testing.assert_allclose(
            w2_plain[k] - w2_prox[k], lr * mu * (w1[k] - g[k]), rtol=1e-4, atol=1e-6
        )
    assert any(np.abs(w1[k] - g[k]).max() > 1e-3 for k in g)


def test_fedprox_without_mu_takes_plain_sgd_steps() -> None:
    """mu = 0, one full batch: the update is w - lr * grad(mean cross-entropy), computed
    here by hand with torch's autograd (so the loop's batching and optimiser are checked)."""
    model = build_model(SPEC, seed=0)
    g = model_to_arrays(model)
    data, lr = _data(n=20), 0.1
    instr = _instr("fedprox", proximal_mu=0.0, local_epochs=1, batch_size=20)
    got = get_algorithm("fedprox").client_update(
        model, g, None, data, instr, torch.Generator().manual_seed(2)
    )
    ref = build_model(SPEC, seed=1)
    load_arrays(ref, g)
    F.cross_entropy(ref(data.x_train), data.y_train).backward()
    for name, p in ref.named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) > 0
        expected = (p.detach() - lr * p.grad).numpy()
        np.testing.assert_allclose(got.shared[name], expected, rtol=1e-5, atol=1e-6)


def _shared(name: str, mu: float) -> dict[str, np.ndarray]:
    model = build_model(SPEC, seed=0)
    g = model_to_arrays(model)
    instr = _instr(name, proximal_mu=mu)
    return (
        get_algorithm(name)
        .client_update(model, g, None, _data(), instr, torch.Generator().manual_seed(2))
        .shared
    )


def test_only_fedprox_trains_with_the_proximal_term() -> None:
    """client.proximal_mu moves FedProx's update and nothing else's (issue 8: a FedProx
    strategy once added the term to Ditto's global update)."""
    for name in ("fedavg", "ditto", "apfl"):
        a, b = _shared(name, 0.0), _shared(name, 5.0)
        assert all(np.array_equal(a[k], b[k]) for k in a), name
    plain, prox = _shared("fedprox", 0.0), _shared("fedprox", 5.0)
    assert any(not np.array_equal(plain[k], prox[k]) for k in plain)
    fedavg = _shared("fedavg", 5.0)
    assert all(np.array_equal(plain[k], fedavg[k]) for k in plain)
