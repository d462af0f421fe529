"""Accuracy after N rounds for each attack x defence: the robustness table.

Run: ``PYTHONPATH=. python bench/robustness.py [--datasets quickstart mnist] [--rounds N]
[--save FILE.jsonl] [--table FILE.jsonl] [--out bench/results/robustness.md]``.

Each cell is one run of the real ``ServerLoop`` and the real ClientApp in this one
process (``tests.inprocess_grid.InProcessGrid``: no Ray, no SuperLink; the same
numbers as a real simulation of the same config, since both are seeded per device
and aggregate in device-id order). Poisoned devices are simulated where an attacker
sits, on the device (``[attack]``); the defences are server-side (``strategy.*``).

Datasets: ``quickstart`` is ``configs/quickstart.toml`` (bundled digits, 20 devices
with two digits each, CNN); ``mnist`` is MNIST from ``../shared/data/mnist.npz``
split pathologically (two digits per device, 100 devices, McMahan's 2NN), skipped
with a message when the file is absent. Both: 11 devices per round, 20% of the
population malicious (a seeded set, the same in every cell), Krum/MultiKrum/Bulyan
assume ``num_malicious = 2`` (the expected malicious devices per round), trimmed
mean cuts 20% at each end, ``clip_norm`` is the norm bound of "fedavg+clip".
The metric is the global model's accuracy on the server's held-out test set after
the last round (the model every user is served).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "quickstart.toml"
MALICIOUS_FRACTION = 0.2
PER_ROUND = 11
ASSUMED_MALICIOUS = 2

ATTACKS: dict[str, tuple[str, list[str]]] = {
    "none": ("none", []),
    "scale": ("scale x10", ["attack.kind='scale'", "attack.scale=10"]),
    "sign_flip": ("sign flip x4", ["attack.kind='sign_flip'", "attack.scale=4"]),
    "label_flip": ("label flip", ["attack.kind='label_flip'"]),
    "noise": ("noise, std 1", ["attack.kind='noise'", "attack.noise_std=1.0"]),
    "nan": ("NaN", ["attack.kind='nan'"]),
    "inflate_count": ("example count x10", ["attack.kind='inflate_count'", "attack.scale=10"]),
}
"""name -> (label in the table, overrides)."""
DEFENCES: dict[str, list[str]] = {
    "fedavg": ["strategy.name='fedavg'"],
    "fedavg+clip": ["strategy.name='fedavg'"],  # clip_norm added per dataset
    "fedmedian": ["strategy.name='fedmedian'"],
    "fedtrimmedavg": ["strategy.name='fedtrimmedavg'", "strategy.trim_beta=0.2"],
    "krum": ["strategy.name='krum'"],
    "multikrum": ["strategy.name='multikrum'"],
    "bulyan": ["strategy.name='bulyan'"],
}


def datasets(data_dir: Path) -> dict[str, tuple[str, list[str], float]]:
    """name -> (description, overrides on configs/quickstart.toml, clip_norm).

    ``clip_norm`` is near the median norm of honest updates, measured without attack
    in rounds 1-6 (quickstart 0.9-1.1, MNIST 1.0-1.7): a bound that honest devices
    barely feel and that a scaled update cannot exceed."""
    mnist = data_dir / "mnist.npz"
    return {
        "quickstart": (
            "bundled digits, 20 devices x 2 digits (pathological), CNN, 2 local epochs",
            [],
            1.0,
        ),
        "mnist": (
            f"MNIST ({mnist}), 100 devices x 2 digits (pathological), 2NN, 1 local epoch",
            [
                "data.dataset='npz'",
                f"data.path='{mnist}'",
                "partition.num_devices=100",
                "model.name='mlp2nn'",
                "client.local_epochs=1",
                "client.lr=0.05",
            ],
            1.5,
        ),
    }


def overrides(dataset: list[str], clip: float, attack: str, defence: str, rounds: int) -> list[str]:
    sets = [
        *dataset,
        f"rounds={rounds}",
        f"strategy.devices_per_round={PER_ROUND}",
        f"strategy.num_malicious={ASSUMED_MALICIOUS}",
        f"evaluation.every={rounds}",
        "evaluation.devices='sample'",
        "evaluation.sample_devices=20",
        "evaluation.finetune_steps=0",
        "output.plot=false",
        *DEFENCES[defence],
        *ATTACKS[attack][1],
    ]
    if defence == "fedavg+clip":
        sets.append(f"strategy.clip_norm={clip}")
    if attack != "none":
        sets.append(f"attack.fraction={MALICIOUS_FRACTION}")
    return sets


def prepare(data_dir: Path, dataset: str, rounds: int) -> tuple[Path, object]:
    """One run folder per dataset: the partition is the same in every cell (same seed,
    same split), so it is built and loaded once; each cell starts from fresh device
    state (``devices/`` removed) and its own metrics (``Recorder.start``)."""
    from common.config import load_config
    from common.data import open_source
    from common.rundir import PARTITION_FILE, prepare_run_dir

    _, sets, clip = datasets(data_dir)[dataset]
    cfg = load_config(CONFIG, overrides(sets, clip, "none", "fedavg", rounds))
    run_dir = Path(tempfile.mkdtemp(prefix=f"robust-{dataset}-"))
    prepare_run_dir(cfg, run_dir)
    return run_dir, open_source(cfg, run_dir / PARTITION_FILE)


def run_one(
    data_dir: Path, dataset: str, attack: str, defence: str, rounds: int, prepared: tuple
) -> dict:
    """One cell, in this process: last-round global test accuracy, or why it stopped."""
    from common.config import load_config
    from common.rundir import METRICS_FILE, STATE_DIR, read_jsonl
    from server.loop import ServerLoop
    from tests.inprocess_grid import InProcessGrid

    run_dir, src = prepared
    _, sets, clip = datasets(data_dir)[dataset]
    cfg = load_config(CONFIG, overrides(sets, clip, attack, defence, rounds))
    for f in (run_dir / STATE_DIR).glob("*"):  # the folder stays: workers cache its store
        f.unlink()
    t0, c0 = time.perf_counter(), time.process_time()
    result: dict[str, object] = {"dataset": dataset, "attack": attack, "defence": defence}
    loop = ServerLoop(InProcessGrid(run_dir, 2), cfg, run_dir, src)
    bad = cfg.attack.malicious(cfg.seed, cfg.partition.num_devices)
    pool = loop.population.train_pool()
    picked = [len(bad & set(loop.selection.select(r, pool))) for r in range(1, rounds + 1)]
    try:
        loop.run()
        row = loop.recorder.last
        result["acc"] = row.global_test_acc if row is not None else None
    except Exception as err:  # a run that stops is a result too (e.g. Bulyan short)
        result["stopped"] = f"{type(err).__name__}: {str(err)[:160]}"
    rows = read_jsonl(run_dir / METRICS_FILE)
    result.update(
        rounds=rounds,
        rounds_done=len(rows),
        malicious=len(bad),
        malicious_per_round=sum(picked) / len(picked),
        rejected=sum(int(r["num_rejected"]) for r in rows),
        wall_s=time.perf_counter() - t0,
        cpu_s=time.process_time() - c0,
    )
    return result


def cell(r: dict | None) -> str:
    if r is None:
        return "–"
    if "stopped" in r:
        return f"stopped r{int(r['rounds_done']) + 1}"
    text = f"{100 * float(r['acc']):.1f}"
    return text + (f" ({r['rejected']} rej.)" if r["rejected"] else "")


def table(results: list[dict], dataset: str) -> str:
    by = {(r["attack"], r["defence"]): r for r in results if r["dataset"] == dataset}
    lines = [
        "| attack \\ defence | " + " | ".join(DEFENCES) + " |",
        "|---|" + "---|" * len(DEFENCES),
    ]
    for a, (label, _) in ATTACKS.items():
        lines.append(f"| {label} | " + " | ".join(cell(by.get((a, d))) for d in DEFENCES) + " |")
    return "\n".join(lines)


def stops(results: list[dict]) -> list[str]:
    return [
        f"- {r['dataset']}, {r['attack']}, {r['defence']}: {r['stopped']}"
        for r in results
        if "stopped" in r
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["quickstart", "mnist"])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--attacks", nargs="+", choices=list(ATTACKS), default=list(ATTACKS))
    p.add_argument("--defences", nargs="+", choices=list(DEFENCES), default=list(DEFENCES))
    shared = os.environ.get("HYBRIDFL_SHARED_DATA") or ROOT.parent / "shared" / "data"
    p.add_argument("--data-dir", type=Path, default=Path(shared), help="$HYBRIDFL_SHARED_DATA")
    p.add_argument("--save", type=Path, default=None, help="append each cell as a JSON line")
    p.add_argument("--table", type=Path, default=None, help="print the tables of a --save file")
    args = p.parse_args()
    if args.table is not None:
        saved = [json.loads(x) for x in args.table.read_text().splitlines() if x.strip()]
        last = {(r["dataset"], r["attack"], r["defence"]): r for r in saved}
        results = list(last.values())
        for name in dict.fromkeys(r["dataset"] for r in results):
            print(f"## {name}\n\n{table(results, name)}\n")
        print("\n".join(stops(results)))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    print(
        f"# {platform.platform()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
        f"Python {platform.python_version()}, torch {torch.__version__}",
        flush=True,
    )
    known = datasets(args.data_dir)
    results = []
    for name in args.datasets:
        if name == "mnist" and not (args.data_dir / "mnist.npz").is_file():
            print(f"# skipping mnist: {args.data_dir / 'mnist.npz'} not found (--data-dir)")
            continue
        if name not in known:
            raise SystemExit(f"unknown dataset {name!r}: choose from {sorted(known)}")
        prepared = prepare(args.data_dir, name, args.rounds)
        for attack in args.attacks:
            for defence in args.defences:
                r = run_one(args.data_dir, name, attack, defence, args.rounds, prepared)
                results.append(r)
                print(
                    f"# {name} | {attack} | {defence}: {cell(r)} "
                    f"({r['cpu_s']:.0f} CPU s, {r['wall_s']:.0f} s, load "
                    f"{os.getloadavg()[0]:.1f})",
                    flush=True,
                )
                if args.save is not None:
                    with args.save.open("a") as f:
                        f.write(json.dumps(r) + "\n")
        shutil.rmtree(prepared[0], ignore_errors=True)
        print(f"\n## {name}\n\n{table(results, name)}\n")
    print("\n".join(stops(results)))


if __name__ == "__main__":
    main()
