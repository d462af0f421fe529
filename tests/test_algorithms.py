"""Each algorithm's defining property, on a real model and real training steps."""

from __future__ import annotations

import numpy as np
import torch

from client.algorithms import ALGORITHMS, get_algorithm
from client.algorithms.loop import DeviceData, proximal_term
from common.models import ModelSpec, build_model
from common.protocol import RoundInstructions
from common.weights import model_to_arrays

SPEC = ModelSpec(name="mlp2nn", input_shape=(1, 8, 8), num_classes=10, hidden=16)


def _data(seed: int = 0, n: int = 40) -> DeviceData:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DeviceData(x, y, x[:10], y[:10])


def _instr(algorithm: str, **kw: float) -> RoundInstructions:
    return RoundInstructions(
        round=1, seed=0, algorithm=algorithm, model_spec=SPEC.model_dump_json(), lr=0.1, **kw
    )


def test_registry_lists_both() -> None:
    assert {"fedavg", "fedper"} <= set(ALGORITHMS)


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
        upd = get_algorithm("fedavg").client_update(
            model,
            g,
            None,
            _data(),
            _instr("fedavg", proximal_mu=mu),
            torch.Generator().manual_seed(0),
        )
        return sum(float(np.sum((upd.shared[k] - g[k]) ** 2)) for k in g)

    assert drift(10.0) < drift(0.0)
