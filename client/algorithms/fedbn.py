"""FedBN (Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization", ICLR 2021, arXiv:2102.07623): batch-norm layers stay on the device.

Every batch-norm layer's affine weights *and* running statistics are personal;
everything else is averaged. Why: when devices differ in their feature
distribution (scanners, handwriting, lighting), local normalisation absorbs the
shift and the shared layers can agree. Which keys are batch-norm is decided in
``common.personalization.batchnorm_keys`` (shared with the server); the model must
have them (``model.batch_norm = true``, enforced by the config). The base class does
the rest: training starts from the global model with the device's BN layers
restored, and the personalized model is the global model under the device's BN.
"""

from __future__ import annotations

from typing import ClassVar

from client.algorithms.base import Algorithm
from common.personalization import ALGORITHMS, AlgorithmSpec


class FedBN(Algorithm):
    spec: ClassVar[AlgorithmSpec] = ALGORITHMS["fedbn"]
