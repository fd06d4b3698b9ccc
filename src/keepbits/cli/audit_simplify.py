"""``keepbits audit simplify``: SimpleBits post-hoc simplification (Alg. 1 and 2) of images
for a trained classifier; before/after figures in an HTML + JSON report."""
from __future__ import annotations

import argparse
import json

from keepbits.cli._common import (
    CLASSIFIER_SPEC_HELP, POSITIVE_LR, SEED, add_argument, add_classifier_options, add_device_option, add_frame_step_option,
    add_threads_option, classifier_options, command_line, existing_path, non_negative_float, output_folder, positive_int,
)
from keepbits.errors import InputError

HELP = "SimpleBits post-hoc simplification audit: lowest-bpd image the classifier treats like the original; HTML+JSON report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"the classifier: {CLASSIFIER_SPEC_HELP}")
    add_classifier_options(p)
    add_argument(p, "--data", required=True, deprecated=["--images"],
                 help="a labelled data set (.npz file, idx folder, split folder or class-folder tree) or your footage (image folders "
                      "of any nesting, videos)")
    add_frame_step_option(p)
    p.add_argument("--out", required=True, help="output folder for report.html / report.json")
    p.add_argument("--density", default=None, help="density checkpoint (default: the shipped CIFAR-10 Glow)")
    p.add_argument("--split", choices=["train", "test"], default="test", help="split holding the simplified images")
    p.add_argument("--num-images", type=int, default=4,
                   help="simplify a random sample of N images (class-balanced from a labelled set; seed --seed), kept in file order")
    p.add_argument("--steps", type=positive_int, default=100, help="Adam steps on the Glow latent per image")
    p.add_argument("--lambda-sim", type=non_negative_float, default=1.0, help="weight of the bits per dimension of the simplified image in the loss (Alg. 1)")
    p.add_argument("--lr", type=POSITIVE_LR, default=0.05, help="Adam learning rate on the Glow latent")
    p.add_argument("--kl-tolerance", type=non_negative_float, default=0.1, help="largest KL(original ‖ simplified) for an image to count as 'kept' (with the same arg-max)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the image sample and the optimisation")
    add_threads_option(p)
    add_device_option(p)


def run(args: argparse.Namespace) -> int:
    existing_path(args.data, "data path")
    if args.density is not None:
        existing_path(args.density, "density checkpoint")
    if args.num_images < 1 or args.steps < 0:
        raise InputError(f"--num-images must be positive and --steps >= 0, got {args.num_images}, {args.steps}")
    output_folder(args.out, writes=("report.html", "report.json"))
    import torch

    from keepbits.audit.simplify import audit_simplify
    from keepbits.data.images import model_images
    from keepbits.training.byo import resolve_classifier

    if args.threads:
        torch.set_num_threads(args.threads)
    classifier = resolve_classifier(args.model, **classifier_options(args))
    drawn = model_images(args.data, classifier.preprocessing, split=args.split, num_images=args.num_images, seed=args.seed,
                         frame_step=args.frame_step)
    images = drawn.images
    sample = f"{len(images)} (class-balanced sample, seed {args.seed})" if drawn.labelled else drawn.source
    meta = {"model": args.model, "data": args.data, "split": args.split, "images": sample, "command": command_line()}

    def named(y: int) -> str:  # the data's class name and index: a model without class names predicts indices
        name = drawn.class_names[y] if drawn.class_names else str(y)
        return name if name == str(y) else f"{name} ({y})"

    labels = [named(y) for y in drawn.labels.tolist()] if drawn.labelled else None
    paths = audit_simplify(classifier, images, args.out, density=args.density, meta=meta, image_names=drawn.names, data_labels=labels,
                           steps=args.steps, lambda_sim=args.lambda_sim, lr=args.lr, kl_tolerance=args.kl_tolerance, seed=args.seed,
                           device=args.device, progress=not args.quiet)
    print(json.dumps({"report": [str(p) for p in paths]}, indent=2))
    return 0
