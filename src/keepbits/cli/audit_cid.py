"""``keepbits audit cid``: layer-wise and pixel-wise information discarding (Ma, Zhang et al.
ICML 2022) of one or several classifiers: CID, RU and concentration per layer, heatmaps,
HTML + JSON report."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from keepbits.cli._common import (
    CLASSIFIER_SPEC_HELP, SEED, add_argument, add_classifier_options, add_device_option, add_frame_step_option, add_threads_option,
    classifier_options, command_line, existing_path, output_folder, positive_int,
)
from keepbits.errors import InputError

log = logging.getLogger("keepbits")
HELP = "CID audit: per-layer information discarding (CID), reconstruction uncertainty (RU) and concentration; HTML+JSON report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, nargs="+", metavar="SPEC",
                   help=f"the classifier(s), each {CLASSIFIER_SPEC_HELP}; several give one curve each")
    add_classifier_options(p)
    p.add_argument("--data", required=True, help="a labelled data set (.npz file, idx folder, split folder or class-folder tree) or "
                   "your footage (image folders of any nesting, videos; the audited images only: --ru and --boxes need a data set)")
    add_frame_step_option(p)
    p.add_argument("--layers", nargs="+", default=["auto"], help="module names (see the error message for the list); 'auto': block-level layers")
    p.add_argument("--out", required=True, help="output folder for report.html / report.json")
    p.add_argument("--split", choices=["train", "test"], default="test", help="split holding the audited images")
    p.add_argument("--num-images", type=int, default=8,
                   help="audit a random sample of N images (class-balanced from the split of a labelled set; seed --seed)")
    p.add_argument("--boxes", default=None, help="foreground boxes (CSV with the header line index,x0,y0,x1,y1, or JSON; index: the image's position in the split, listed in the report) "
                   "for the concentration (Eq. 5); boxes of images outside the sample are ignored")
    p.add_argument("--beta", type=float, default=1.5e-4, help="target E|f'-f|^2 / delta_f^2 (Eq. 4)")
    p.add_argument("--block", type=int, default=1, help="sigma shared by block x block pixels")
    p.add_argument("--max-steps", type=int, default=1000, help="budget of forward-backward passes per map (maps still moving then are reported as not converged)")
    p.add_argument("--min-steps", type=int, default=100, help="forward-backward passes before a map may stop (once its ratio is on target and its entropy on a plateau at the smallest lr)")
    p.add_argument("--samples", type=int, default=2, help="noise draws per step")
    p.add_argument("--batch-size", type=positive_int, default=16, help="(image, layer) maps optimised together")
    p.add_argument("--ru", action="store_true", help="also reconstruction uncertainty (trains one decoder per layer, cached)")
    add_argument(p, "--num-decoder-images", type=int, default=2000, deprecated=["--ru-train-images"],
                 help="decoder training images for --ru: a random class-balanced sample (seed --seed) of the train split, "
                      "or of the audited split without the audited images when --split is train or there is no train split")
    p.add_argument("--decoder-epochs", type=positive_int, default=3, help="epochs of each RU decoder")
    p.add_argument("--decoder-width", type=positive_int, default=48, help="channels of the RU decoders")
    p.add_argument("--decoder-blocks", type=positive_int, default=6, help="residual blocks of the RU decoders")
    p.add_argument("--cache", default="default", help="decoder cache folder ('default': ~/.cache/keepbits/cid-decoders); 'none' disables")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the image samples, the noise and the decoders")
    add_threads_option(p)
    add_device_option(p)


def run(args: argparse.Namespace) -> int:
    existing_path(args.data, "data path")
    if args.num_images < 1:
        raise InputError(f"--num-images must be positive, got {args.num_images}")
    output_folder(args.out, writes=("report.html", "report.json"))
    options = classifier_options(args)
    if len(args.model) > 1 and (options["weights"] or options["kwargs"]):
        raise InputError("--classifier-weights/--classifier-kwargs name one classifier's weights; give one --model with them")
    import torch

    from keepbits.audit.cid import CIDConfig, load_boxes
    from keepbits.audit.cid_report import cid_report, layerwise_cid
    from keepbits.audit.cid_ru import DecoderConfig
    from keepbits.data.images import is_labelled_set, model_images
    from keepbits.report import plural
    from keepbits.training.byo import resolve_classifier
    from keepbits.training.distributed import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    labelled = is_labelled_set(Path(args.data), args.split)
    if not labelled and (args.ru or args.boxes):
        raise InputError(f"{args.data}: footage has no split to train RU decoders on and no image indices for --boxes; "
                         "give a data set for --ru/--boxes")
    classifiers = [resolve_classifier(spec, **options) for spec in args.model]
    boxes = load_boxes(args.boxes) if args.boxes else {}
    config = CIDConfig(beta=args.beta, block=args.block, max_steps=args.max_steps, min_steps=args.min_steps,
                       samples=args.samples, seed=args.seed, device=resolve_device(args.device))
    decoder = DecoderConfig(blocks=args.decoder_blocks, width=args.decoder_width, epochs=args.decoder_epochs, seed=args.seed)
    runs, described = [], ""
    for spec, clf in zip(args.model, classifiers):  # each classifier sees the images through its own preprocessing
        drawn = model_images(args.data, clf.preprocessing, split=args.split, num_images=args.num_images, seed=args.seed,
                             frame_step=args.frame_step)
        images, described, ru_images, foreground = drawn.images, drawn.source, None, {}
        if labelled:  # names are the images' indices in the split: for the boxes and the RU decoders' other images
            audited = [int(name) for name in drawn.names]
            ru_images = _decoder_images(args, clf.preprocessing, audited) if args.ru else None
            foreground = {j: boxes[i] for j, i in enumerate(audited) if i in boxes}
            if boxes and not foreground:  # a user keying boxes by the sample's positions gets nothing, and should hear so
                log.warning("--boxes: none of its %d boxes is for an audited image (indices in the %s split: %s); "
                            "no concentration", len(boxes), args.split, ", ".join(map(str, audited[:12])) + (", …" if len(audited) > 12 else ""))
            described = f"{len(audited)} (class-balanced sample, seed {args.seed}; indices in the {args.split} split: " \
                        f"{', '.join(map(str, audited[:50]))}{', …' if len(audited) > 50 else ''})"
        runs.append(layerwise_cid(clf, images, None if args.layers == ["auto"] else args.layers, config, name=_run_name(spec),
                                  ru_images=ru_images, decoder=decoder, foreground=foreground,
                                  cache_dir=None if args.cache == "none" else args.cache, batch_size=args.batch_size,
                                  progress=not args.quiet))
    paths = cid_report(runs, args.out, meta={"data": args.data, "split": args.split, "images": described, "command": command_line()})
    if not args.quiet:
        for r in runs:
            summary = r["summary"]
            moving = sum(1 for converged in summary["converged"] if converged < summary["images"])
            print(f"keepbits: {r['name']}: CID of {plural(len(summary['layer']), 'layer')} on {plural(summary['images'], 'image')}"
                  + (f"; {moving} layer(s) with maps still moving at --max-steps {args.max_steps} (raise it: their CID is not final)"
                     if moving else "") + f"; wrote {paths[0]}", file=sys.stderr)
    print(json.dumps({"report": [str(p) for p in paths], "summary": {r["name"]: r["summary"] for r in runs}}, indent=2))
    return 0


def _decoder_images(args: argparse.Namespace, pre: Any, audited: list[int]) -> Any:
    """The RU decoders' training images, fitted by the classifier's preprocessing ``pre``: a seeded
    class-balanced sample of the train split, or of the audited split without the audited images
    (``--split train``, or no train split)."""
    import numpy as np

    from keepbits.data import has_split, load_dataset, sample_indices

    fit = dict(size=pre.input_size, policy=pre.resize_policy, crop_fraction=pre.crop_fraction)  # class folders
    if has_split(args.data, "train") and args.split != "train":
        images = load_dataset(args.data, split="train", **fit).sample(args.num_decoder_images, args.seed).x
    else:
        data = load_dataset(args.data, split=args.split, **fit)
        rest = np.setdiff1d(np.arange(len(data)), audited)
        images = data.x[rest[sample_indices(data.y[rest], args.num_decoder_images, args.seed)]]
    if len(images) < 20:
        raise InputError(f"{args.data}: only {len(images)} images left to train the RU decoders (need ≥ 20)")
    return images


def _run_name(spec: str) -> str:
    """A curve's name: ``folder/stem`` of a checkpoint or ONNX file, else the SPEC itself."""
    path = Path(spec)
    return f"{path.parent.name}/{path.stem}" if path.is_file() else spec
