"""FEMNIST from LEAF's own preprocessing output into the .npz the ``femnist`` loader reads.

Why not a download: LEAF builds FEMNIST from NIST SD19's ``by_class.zip`` and
``by_write.zip`` (about 1 GB each, images matched across them by hash), and no
sha256 of those archives is published that we could pin. A user runs LEAF's
``preprocess.sh`` (e.g. ``-s niid --sf 0.05 -k 0 -t sample``) and converts its JSON
here: ``{"users": [...], "user_data": {writer: {"x": [[784 floats]], "y": [...]}}}``
under ``train/`` and ``test/``, pixels in [0, 1] with 1 = white background (LEAF's
``data_to_json.py``: ``gray / 255``). We store uint8 with 0 = background, like
``femnist_105writers.npz``, and keep the writers that have both splits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.atomic import write_npz

LEAF_SIDE = 28
FEMNIST_OUTPUT = "femnist.npz"


class LeafError(ValueError):
    """The folder is not LEAF's FEMNIST output; the message says what was expected."""


def _read_split(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Writer -> (images uint8 (N, 28, 28), labels) over every JSON file of one split."""
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise LeafError(
            f"--from-leaf: no LEAF JSON files in {folder} (expected LEAF's "
            "data/femnist/data/{train,test}/*.json from preprocess.sh)"
        )
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path in files:
        try:
            data = json.loads(path.read_text())
            users = data["user_data"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LeafError(f"--from-leaf: {path} is not a LEAF JSON file ({err})") from None
        for writer, d in users.items():
            x = np.asarray(d["x"], dtype=np.float64)
            y = np.asarray(d["y"], dtype=np.int64)
            if x.ndim != 2 or x.shape[1] != LEAF_SIDE * LEAF_SIDE or len(x) != len(y):
                raise LeafError(
                    f"--from-leaf: {path} writer {writer}: x has shape {x.shape} and y "
                    f"{y.shape}; expected ({len(y)}, {LEAF_SIDE * LEAF_SIDE}) 28x28 images"
                )
            if len(x) and (x.min() < 0.0 or x.max() > 1.0 or y.min() < 0 or y.max() > 61):
                raise LeafError(
                    f"--from-leaf: {path} writer {writer}: pixels outside [0, 1] or labels "
                    "outside 0..61; is it FEMNIST?"
                )
            images = np.rint((1.0 - x) * 255.0).astype(np.uint8).reshape(-1, LEAF_SIDE, LEAF_SIDE)
            if writer in out:  # a writer split over two files: append
                images = np.concatenate([out[writer][0], images])
                y = np.concatenate([out[writer][1], y])
            out[writer] = (images, y)
    return out


def convert_leaf_femnist(leaf_dir: Path, to: Path) -> tuple[Path, int, int, int]:
    """Write ``to/femnist.npz``; returns (path, writers, train images, test images)."""
    train, test = _read_split(leaf_dir / "train"), _read_split(leaf_dir / "test")
    writers = sorted(w for w in train if w in test and len(train[w][1]) and len(test[w][1]))
    if not writers:
        raise LeafError(f"--from-leaf: no writer of {leaf_dir} has both a train and a test split")
    arrays: dict[str, np.ndarray] = {"writers": np.array(writers)}
    for split, pool in (("train", train), ("test", test)):
        arrays[f"x_{split}"] = np.concatenate([pool[w][0] for w in writers])
        arrays[f"y_{split}"] = np.concatenate([pool[w][1] for w in writers]).astype(np.uint8)
        arrays[f"writer_{split}"] = np.concatenate(
            [np.full(len(pool[w][1]), i, dtype=np.int32) for i, w in enumerate(writers)]
        )
    to.mkdir(parents=True, exist_ok=True)
    out = to / FEMNIST_OUTPUT
    try:
        write_npz(out, arrays)
    except OSError as err:
        raise LeafError(f"cannot write {out} ({err.strerror or err})") from None
    return out, len(writers), len(arrays["y_train"]), len(arrays["y_test"])
