"""``keepbits audit simplify``: SimpleBits post-hoc simplification (Alg. 1 and 2) of images
for a trained classifier; before/after figures in an HTML + JSON report."""
from __future__ import annotations

import argparse
import json

from keepbits.cli._common import existing_path
from keepbits.errors import InputError

HELP = "SimpleBits post-hoc simplification audit: lowest-bpd image the classifier treats like the original; HTML+JSON report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="classifier checkpoint (.pt)")
    p.add_argument("--images", required=True, help=".npz file, idx folder, split folder or class-folder tree")
    p.add_argument("--out", required=True, help="output folder for report.html / report.json")
    p.add_argument("--density", default=None, help="density checkpoint (default: the shipped CIFAR-10 Glow)")
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--num-images", type=int, default=4, help="simplify N images drawn by a seeded permutation (--seed), kept in file order; files such as CIFAR-10's are sorted by class")
    p.add_argument("--steps", type=int, default=100, help="Adam steps on the Glow latent per image")
    p.add_argument("--lambda-sim", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--kl-tolerance", type=float, default=0.1, help="largest KL(original ‖ simplified) accepted on the path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    existing_path(args.model, "model checkpoint")
    existing_path(args.images, "images path")
    if args.density is not None:
        existing_path(args.density, "density checkpoint")
    if args.num_images < 1 or args.steps < 0:
        raise InputError(f"--num-images must be positive and --steps >= 0, got {args.num_images}, {args.steps}")
    import torch

    from keepbits.audit.simplify import audit_simplify
    from keepbits.data import load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    images = load_dataset(args.images, split=args.split).sample(args.num_images, args.seed).x
    paths = audit_simplify(args.model, images, args.out, density=args.density, steps=args.steps, lambda_sim=args.lambda_sim,
                           lr=args.lr, kl_tolerance=args.kl_tolerance, seed=args.seed)
    print(json.dumps({"report": [str(p) for p in paths]}, indent=2))
    return 0
