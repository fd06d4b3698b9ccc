"""``keepbits audit cid``: layer-wise and pixel-wise information discarding (Ma, Zhang et al.
ICML 2022) of one or several classifiers: CID, RU and concentration per layer, heatmaps,
HTML + JSON report."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from keepbits.cli._common import command_line, existing_path
from keepbits.errors import InputError

HELP = "CID audit: per-layer information discarding (CID), reconstruction uncertainty (RU) and concentration; HTML+JSON report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, nargs="+", help="classifier checkpoint(s) (.pt); several give one curve each")
    p.add_argument("--data", required=True, help=".npz file, idx folder, split folder or class-folder tree")
    p.add_argument("--layers", nargs="+", default=["auto"], help="module names (see the error message for the list); 'auto': block-level layers")
    p.add_argument("--out", required=True, help="output folder for report.html / report.json")
    p.add_argument("--split", choices=["train", "test"], default="test", help="split holding the audited images (default test)")
    p.add_argument("--num-images", type=int, default=8, help="audit the first N images of the split")
    p.add_argument("--boxes", default=None, help="foreground boxes (CSV index,x0,y0,x1,y1 or JSON) for the concentration (Eq. 5)")
    p.add_argument("--beta", type=float, default=1.5e-4, help="target E|f'-f|^2 / delta_f^2 (Eq. 4)")
    p.add_argument("--block", type=int, default=1, help="sigma shared by block x block pixels")
    p.add_argument("--max-steps", type=int, default=300, help="budget of forward-backward passes per map")
    p.add_argument("--min-steps", type=int, default=60)
    p.add_argument("--samples", type=int, default=2, help="noise draws per step")
    p.add_argument("--batch-size", type=int, default=16, help="(image, layer) maps optimised together")
    p.add_argument("--ru", action="store_true", help="also reconstruction uncertainty (trains one decoder per layer, cached)")
    p.add_argument("--ru-train-images", type=int, default=2000, help="decoder training images (train split)")
    p.add_argument("--decoder-epochs", type=int, default=3)
    p.add_argument("--decoder-width", type=int, default=48)
    p.add_argument("--decoder-blocks", type=int, default=6)
    p.add_argument("--cache", default="default", help="decoder cache folder (default ~/.cache/keepbits/cid-decoders); 'none' disables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    existing_path(args.data, "data path")
    for model in args.model:
        existing_path(model, "model checkpoint")
    if args.num_images < 1:
        raise InputError(f"--num-images must be positive, got {args.num_images}")
    import torch

    from keepbits.audit.cid import CIDConfig, load_boxes
    from keepbits.audit.cid_report import cid_report, layerwise_cid
    from keepbits.audit.cid_ru import DecoderConfig
    from keepbits.data import has_split, load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset(args.data, split=args.split)
    images = data.x[: args.num_images]
    ru_images = None
    if args.ru:
        if has_split(args.data, "train") and args.split != "train":
            ru_images = load_dataset(args.data, split="train").x[: args.ru_train_images]
        else:
            ru_images = data.x[args.num_images : args.num_images + args.ru_train_images]
        if len(ru_images) < 20:
            raise InputError(f"{args.data}: only {len(ru_images)} images left to train the RU decoders (need ≥ 20)")
    boxes = load_boxes(args.boxes) if args.boxes else None
    config = CIDConfig(beta=args.beta, block=args.block, max_steps=args.max_steps, min_steps=args.min_steps,
                       samples=args.samples, seed=args.seed)
    decoder = DecoderConfig(blocks=args.decoder_blocks, width=args.decoder_width, epochs=args.decoder_epochs, seed=args.seed)
    layers = None if args.layers == ["auto"] else args.layers
    runs = []
    for model in args.model:
        path = Path(model)
        runs.append(layerwise_cid(
            str(path), images, layers, config, name=f"{path.parent.name}/{path.stem}", ru_images=ru_images, decoder=decoder,
            foreground={i: b for i, b in (boxes or {}).items() if i < len(images)},
            cache_dir=None if args.cache == "none" else args.cache, batch_size=args.batch_size,
        ))
    paths = cid_report(runs, args.out, meta={"data": args.data, "split": args.split, "command": command_line()})
    print(json.dumps({"report": [str(p) for p in paths], "summary": {r["name"]: r["summary"] for r in runs}}, indent=2))
    return 0
