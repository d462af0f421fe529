"""Cold start: what a brand-new device gets from the served model before it trains.

Why: in hybrid serving a device that joins for the first time starts from the
model server's ``serving`` version, not from the federation's message. Measuring
that model on the device's own test split, once, tells what a new user sees on
day one; the device reports it with its first training reply
(``TrainReport.cold_start_acc``).
Only real devices whose node config names a ``model-server`` do this; simulation
is unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

from client.algorithms.loop import DeviceData

log = logging.getLogger("hybridfl.client")

CACHE_DIR = "model-cache"


def cold_start_metrics(
    model_server: str,
    state_root: Path,
    data: DeviceData,
    batch_size: int,
    ca_cert: Path | None = None,
    verify_key: Path | None = None,
) -> dict[str, float | int | bool]:
    """Fetch ``serving`` (verified, cached under the state folder) and evaluate it.

    Returns ``acc`` and ``version``, or ``failed``: a failed fetch never fails the
    training round; it is reported and logged, and the device trains from the message.
    """
    if not model_server:
        return {}
    from client.fetch import FetchError, fetch_model, load_fetched_model
    from common.scoring import evaluate

    try:
        cache = state_root / CACHE_DIR
        res = fetch_model(
            model_server, alias="serving", cache_dir=cache, ca_cert=ca_cert, verify_key=verify_key
        )
        model = load_fetched_model(res)
    except (FetchError, OSError, ValueError) as err:
        log.warning("cold-start fetch from %s failed: %s", model_server, err)
        return {"failed": True}
    _, acc = evaluate(model, data.x_test, data.y_test, batch_size)
    return {"acc": float(acc), "version": int(res.manifest.version)}
