"""Synthetic(alpha, beta): a federated population generated on demand, never stored.

Li et al., "Federated Optimization in Heterogeneous Networks" (FedProx, MLSys 2020,
section 5.1 and their ``generate_synthetic.py``) define a population in which every
device k has its own softmax-regression "teacher" and its own feature distribution:

- ``u_k ~ N(0, alpha)`` and ``B_k ~ N(0, beta)`` (``alpha``/``beta`` are standard
  deviations, as ``np.random.normal``'s ``scale`` in their code);
- ``W_k ~ N(u_k, 1)`` of shape (classes, features) and ``b_k ~ N(u_k, 1)``: ``alpha``
  is meant to set how much the devices' models (hence label distributions) differ;
- ``v_k ~ N(B_k, 1)`` per feature and ``x ~ N(v_k, Sigma)``, ``Sigma`` diagonal with
  ``Sigma_jj = j^-1.2``: ``beta`` sets how much the devices' features differ;
- ``y = argmax softmax(W_k x + b_k)``; 60 features, 10 classes;
- per-device sample counts ``floor(lognormal(4, 2)) + 50`` (a power-law-like tail).

One deliberate change: Li et al. draw one scalar ``u_k`` per device, which adds the
same ``u_k (sum_j x_j + 1)`` to every class's logit, so the argmax (the label) ignores
it and ``alpha`` has no effect at all on their data (checked here: the same seed with
alpha 0 and 5 gives identical labels). We draw ``u_k ~ N(0, alpha)`` per class (a
10-vector; row c of ``W_k`` and ``b_kc`` have mean ``u_kc``), which shifts the classes'
logits differently per device, so label skew grows with ``alpha`` as the paper
intends. Their Synthetic(alpha, beta) is distributed as our Synthetic(0, beta).

Their IID variant (``iid=True`` here) shares one ``W, b ~ N(0, 1)`` across all devices
and draws every ``x ~ N(0, Sigma)``.

Why generated, and how: a cross-device simulation has 10^5-10^6 devices of which a
hundred train per round, so the population must cost nothing until a device is asked
for. Everything about device ``k`` is a pure function of ``(seed, k)``:

- its sample count comes from a counter-based hash of ``(seed, k)`` (splitmix64, then
  Box-Muller), so :func:`synthetic_sizes` computes 10^6 counts in one vectorised pass
  (~0.07 s on 2 shared cores) and :func:`synthetic_size` one count in O(1), the same;
- its model, feature mean and samples come from its own generator
  ``numpy_rng(seed, "synthetic", 0, k)``, so a device is the same whichever devices
  were generated before it, in whatever process.

Start-up and memory therefore do not depend on ``num_devices`` (it is only checked
against the device id and used to sample the server's test devices).

Feature scale: the samples are returned as generated (per-feature values of order
``1 + beta``, not the [0, 1] range of the image datasets); rescaling does not help. A
logistic model with the project's default SGD (lr 0.05, batch 10), measured with the
pooled test splits of 100 devices: centralized, 5 epochs: 80% / 93% / 95% accuracy on
Synthetic(0,0) / (0.5,0.5) / (1,1); FedAvg, 10 of 100 devices per round, E=1, 200
rounds: 69% / 78% / 83%, in the range Li et al. report for FedAvg. On (1,1) (with
their scalar u_k), rescaling the features by 0.3 or lr 0.01 changed FedAvg by < 2
points after 100 rounds; E=5 was worse (client drift).
"""

from __future__ import annotations

import numpy as np

from common.seeding import derive_seed, numpy_rng

from .dataset import DataError

SYNTHETIC_FEATURES = 60
SYNTHETIC_CLASSES = 10
SYNTHETIC_INPUT_SHAPE = (1, 1, SYNTHETIC_FEATURES)
"""(C, H, W) of one sample in the project's NCHW layout; the logistic and 2NN models
flatten it back to 60 features."""

MEAN_LOG = 4.0
"""Li et al.'s ``np.random.lognormal(4, 2)``: mean of the log of the extra samples."""
SIGMA_LOG = 2.0
"""... and its standard deviation."""
MIN_SAMPLES = 50
"""Li et al.'s ``+ 50``: every device holds at least this many samples."""
MAX_SAMPLES = 1000
"""Cap on a device's samples. Li et al. had no cap (30 devices); with 10^6 devices the
lognormal(4, 2) tail reaches 10^5+ samples on some device, which would make a single
device's generation and training dominate a round. About 7.6% of devices hit the cap."""
TEST_DEVICES = 200
"""Devices whose test splits form the server's global test set (fewer if the
population is smaller)."""

# Stream tags in the ``round_`` slot of ``derive_seed(seed, "synthetic", tag, device)``:
# independent streams per use, so adding a draw in one place never shifts another.
_STREAM_DEVICE, _STREAM_SIZE, _STREAM_TEST_DEVICES, _STREAM_IID_MODEL = 0, 1, 2, 3

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_COV_DIAG = np.arange(1, SYNTHETIC_FEATURES + 1, dtype=np.float64) ** -1.2
_STD = np.sqrt(_COV_DIAG)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al. 2014): a bijection on uint64 arrays whose
    outputs for consecutive inputs look independent. Wrap-around is intended."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _uniform_pairs(key: int, devices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two Uniform(0, 1) float64 per device from one 64-bit hash of (key, device).

    Counter-based (a pure function of key and device), so any device's pair costs O(1)
    and the vectorised pass over all devices gives the same values. 32 bits each are
    plenty for a sample count and halve the hashing of 10^6 devices."""
    h = _mix64(np.uint64(key) + (devices.astype(np.uint64) + np.uint64(1)) * _GOLDEN)
    u1 = (h >> np.uint64(32)).astype(np.float64)
    u2 = (h & np.uint64(0xFFFFFFFF)).astype(np.float64)
    u1 += 0.5
    u1 *= 2.0**-32
    u2 *= 2.0**-32
    return u1, u2


def _check_size_args(
    num_devices: int, mean_log: float, sigma_log: float, min_samples: int, max_samples: int
) -> None:
    if num_devices < 1:
        raise DataError(f"synthetic data: num_devices must be at least 1, got {num_devices}")
    if not np.isfinite(mean_log) or not np.isfinite(sigma_log) or sigma_log < 0:
        raise DataError(
            f"synthetic data: mean_log ({mean_log}) must be finite and sigma_log "
            f"({sigma_log}) finite and >= 0"
        )
    if min_samples < 2:
        raise DataError(
            f"synthetic data: min_samples must be at least 2 (one train and one test "
            f"sample per device), got {min_samples}"
        )
    if max_samples < min_samples:
        raise DataError(
            f"synthetic data: max_samples ({max_samples}) must be >= min_samples ({min_samples})"
        )


def _sizes_of(
    seed: int,
    devices: np.ndarray,
    mean_log: float,
    sigma_log: float,
    min_samples: int,
    max_samples: int,
) -> np.ndarray:
    """Sample counts of ``devices``: ``min_samples + floor(lognormal)``, capped."""
    key = derive_seed(seed, "synthetic", _STREAM_SIZE)
    u1, u2 = _uniform_pairs(key, devices)
    # Box-Muller, in place: z = sqrt(-2 ln u1) cos(2 pi u2) ~ N(0, 1).
    np.log(u1, out=u1)
    u1 *= -2.0
    np.sqrt(u1, out=u1)
    u2 *= 2.0 * np.pi
    np.cos(u2, out=u2)
    z = u1
    z *= u2
    # extra = floor(min(exp(mean_log + sigma_log z), max - min)), clipped before exp so
    # that a huge sigma_log cannot overflow to inf.
    z *= sigma_log
    z += mean_log
    np.minimum(z, np.log(float(max_samples - min_samples) + 1.0), out=z)
    np.exp(z, out=z)
    np.minimum(z, float(max_samples - min_samples), out=z)
    extra = np.floor(z, out=z)
    sizes = extra.astype(np.int64)
    sizes += min_samples
    return sizes


def synthetic_sizes(
    seed: int,
    num_devices: int,
    *,
    mean_log: float = MEAN_LOG,
    sigma_log: float = SIGMA_LOG,
    min_samples: int = MIN_SAMPLES,
    max_samples: int = MAX_SAMPLES,
) -> np.ndarray:
    """int64 (num_devices,): every device's sample count (train + test), vectorised.

    ``min_samples + floor(lognormal(mean_log, sigma_log))`` capped at ``max_samples``
    (Li et al.'s ``lognormal(4, 2).astype(int) + 50``). Device k's count equals
    :func:`synthetic_size` for k and does not depend on ``num_devices``: growing the
    population keeps every existing device. ~0.07 s and 8 bytes per device at 10^6;
    the server needs it only for statistics, never to start.
    """
    _check_size_args(num_devices, mean_log, sigma_log, min_samples, max_samples)
    devices = np.arange(num_devices, dtype=np.int64)
    return _sizes_of(seed, devices, mean_log, sigma_log, min_samples, max_samples)


def synthetic_size(
    seed: int,
    num_devices: int,
    device: int,
    *,
    mean_log: float = MEAN_LOG,
    sigma_log: float = SIGMA_LOG,
    min_samples: int = MIN_SAMPLES,
    max_samples: int = MAX_SAMPLES,
) -> int:
    """One device's sample count (train + test) in O(1): ``synthetic_sizes(...)[device]``
    without computing the others."""
    _check_size_args(num_devices, mean_log, sigma_log, min_samples, max_samples)
    _check_device(device, num_devices)
    devices = np.array([device], dtype=np.int64)
    return int(_sizes_of(seed, devices, mean_log, sigma_log, min_samples, max_samples)[0])


def _check_device(device: int, num_devices: int) -> None:
    if not 0 <= device < num_devices:
        raise DataError(
            f"device id {device} is outside the synthetic population (0..{num_devices - 1}): "
            "check partition.num_devices"
        )


def _split_sizes(n: int, test_fraction: float) -> tuple[int, int]:
    """(train, test) counts: ``round(n * test_fraction)`` test samples, clipped to
    1..n-1, as the partitioners split a device's share."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"synthetic data: test_fraction must be in (0, 1), got {test_fraction}")
    n_test = min(max(round(n * test_fraction), 1), n - 1)
    return n - n_test, n_test


def synthetic_device(
    seed: int,
    device: int,
    num_devices: int,
    alpha: float,
    beta: float,
    test_fraction: float = 0.25,
    *,
    iid: bool = False,
    mean_log: float = MEAN_LOG,
    sigma_log: float = SIGMA_LOG,
    min_samples: int = MIN_SAMPLES,
    max_samples: int = MAX_SAMPLES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)`` of one device of Synthetic(alpha, beta).

    x: float32 (n, 1, 1, 60); y: int64 (n,) in 0..9. A pure function of
    ``(seed, device)`` and the distribution parameters: the device's draws come from
    ``numpy_rng(seed, "synthetic", 0, device)`` and its size from
    :func:`synthetic_size`, so generating device 999,999 of a 10^6 population costs
    the same few hundred microseconds as device 0 and touches nothing else. The
    samples within a device are i.i.d., so the last ``round(n * test_fraction)`` are
    its test split (Li et al. hold out 10% per device; the project's default is 25%).
    ``iid=True`` gives Li et al.'s Synthetic-IID (one shared model, x ~ N(0, Sigma));
    ``alpha`` and ``beta`` are then unused.
    """
    if alpha < 0 or beta < 0 or not np.isfinite(alpha) or not np.isfinite(beta):
        raise DataError(f"synthetic data: alpha ({alpha}) and beta ({beta}) must be >= 0")
    n = synthetic_size(
        seed,
        num_devices,
        device,
        mean_log=mean_log,
        sigma_log=sigma_log,
        min_samples=min_samples,
        max_samples=max_samples,
    )
    n_train, _ = _split_sizes(n, test_fraction)
    rng = numpy_rng(seed, "synthetic", _STREAM_DEVICE, device)
    c, f = SYNTHETIC_CLASSES, SYNTHETIC_FEATURES
    if iid:
        # One teacher for the whole population, from a seed-level stream.
        shared = numpy_rng(seed, "synthetic", _STREAM_IID_MODEL)
        w = shared.normal(0.0, 1.0, (c, f))
        b = shared.normal(0.0, 1.0, c)
        v = np.zeros(f)
    else:
        u = rng.normal(0.0, alpha, c)  # one prior mean per class: see the module doc
        big_b = rng.normal(0.0, beta)
        w = rng.normal(u[:, None], 1.0, (c, f))
        b = rng.normal(u, 1.0, c)
        v = rng.normal(big_b, 1.0, f)
    x = v + rng.standard_normal((n, f)) * _STD  # N(v, diag(j^-1.2))
    y = np.argmax(x @ w.T + b, axis=1).astype(np.int64)  # argmax softmax == argmax logits
    x32 = x.astype(np.float32).reshape(n, *SYNTHETIC_INPUT_SHAPE)
    return x32[:n_train], y[:n_train], x32[n_train:], y[n_train:]


def synthetic_test_devices(
    seed: int, num_devices: int, max_devices: int = TEST_DEVICES
) -> np.ndarray:
    """int64, sorted: the seeded sample of devices whose test splits are the server's
    global test set (all devices if the population has at most ``max_devices``).

    O(max_devices) time and memory whatever ``num_devices`` (numpy's ``choice`` without
    replacement uses a set-based draw when the sample is small next to the population).
    """
    if num_devices < 1 or max_devices < 1:
        raise DataError(
            f"synthetic data: num_devices ({num_devices}) and the number of test devices "
            f"({max_devices}) must be at least 1"
        )
    if num_devices <= max_devices:
        return np.arange(num_devices, dtype=np.int64)
    rng = numpy_rng(seed, "synthetic", _STREAM_TEST_DEVICES)
    chosen = rng.choice(num_devices, size=max_devices, replace=False)
    return np.sort(chosen).astype(np.int64)


def synthetic_test_set(
    seed: int,
    num_devices: int,
    alpha: float,
    beta: float,
    test_fraction: float = 0.25,
    *,
    max_devices: int = TEST_DEVICES,
    iid: bool = False,
    mean_log: float = MEAN_LOG,
    sigma_log: float = SIGMA_LOG,
    min_samples: int = MIN_SAMPLES,
    max_samples: int = MAX_SAMPLES,
) -> tuple[np.ndarray, np.ndarray]:
    """``(x_test, y_test)``: the server's global test set, without storage.

    The concatenated test splits of :func:`synthetic_test_devices` (in device-id
    order). Li et al. evaluate on the union of all devices' test data; a fixed seeded
    sample of devices estimates the same population accuracy at a cost independent of
    the population size (at most ``max_devices * max_samples * test_fraction`` samples).
    """
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for d in synthetic_test_devices(seed, num_devices, max_devices):
        _, _, x, y = synthetic_device(
            seed,
            int(d),
            num_devices,
            alpha,
            beta,
            test_fraction,
            iid=iid,
            mean_log=mean_log,
            sigma_log=sigma_log,
            min_samples=min_samples,
            max_samples=max_samples,
        )
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)
