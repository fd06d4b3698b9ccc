"""SimpleBits Fig. 4 on CPU-sized runs: train simplifier + classifier jointly on a distractor
data set built from real MNIST / CIFAR-10 and measure how much of the distractor the
simplified test images still contain (Pearson correlation with the target part and with the
distractor part, before and after simplification).

    OMP_WAIT_POLICY=PASSIVE nice -n 5 .venv/bin/python bench/simplebits_distractors.py --kinds mnist_cifar cifar_stripes

Writes ``bench/results/simplebits_distractors[_TAG].json`` after every data set and
``..._images.png`` (per set: original, simplified, target part, distractor part).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import add_data_argument, require_data, results_dir, save_image_rows, write_result  # noqa: E402


def main() -> None:
    from keepbits.training.distractors import KINDS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_argument(p, "mnist/ and cifar10/")
    p.add_argument("--kinds", nargs="+", default=["mnist_cifar", "cifar_stripes"], choices=KINDS)
    p.add_argument("--density", default=None)
    p.add_argument("--arch", default="nf_wrn16_2")
    p.add_argument("--n-train", type=int, default=5000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lambda-sim", type=float, default=3.0)
    p.add_argument("--sim-lr", type=float, default=2e-3)
    p.add_argument("--inner-lr", type=float, default=None, help="lr of the unrolled AdamW step of the classifier (default: the classifier's lr, as in the paper)")
    p.add_argument("--unet-base", type=int, default=8)
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="first train the classifier alone for this many AdamW steps and finetune it jointly (0: joint from scratch)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="seed of the classifiers' and the simplifier's initialisation and batches")
    p.add_argument("--device", default=None, help="torch device of the SimpleBits training, e.g. cuda")
    p.add_argument("--tag", default="", help="suffix of the result files")
    args = p.parse_args()
    require_data(p, args.data, "mnist", "cifar10")

    import torch

    from keepbits.data import channel_stats, load_dataset
    from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, save_checkpoint
    from keepbits.training.classifier import fit_classifier
    from keepbits.training.data import TensorArrays
    from keepbits.training.density import images_to_unit
    from keepbits.training.distractors import removal_scores, write_distractor_npz
    from keepbits.training.simplebits import SimpleBitsConfig, build_classifier, load_simplebits, retrain_config, simplify, train_simplebits

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="simplebits_distractors_"))
    name = f"simplebits_distractors{'_' + args.tag if args.tag else ''}"
    rows: list[dict] = []
    strips: list[tuple[str, np.ndarray]] = []
    to_chw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    for kind in args.kinds:
        t0 = time.time()
        npz = write_distractor_npz(kind, args.data, work / f"{kind}.npz", args.n_train, args.n_test)
        pretrained = None
        if args.pretrain_steps:
            train = load_dataset(npz, "train")
            mean, std = channel_stats(train.x)
            c, h, w = train.shape_chw
            torch.manual_seed(args.seed)
            clf, kwargs = build_classifier(args.arch, c, train.num_classes, (h, w), mean, std)
            fit_classifier(clf, TensorArrays(images_to_unit(train.x), train.y), retrain_config(args.pretrain_steps, args.batch_size, seed=args.seed))
            clf = clf.cpu()
            pretrained = save_checkpoint(work / f"{kind}_classifier.pt", Checkpoint(
                kind="classifier", models={"classifier": ModelEntry.of(args.arch, kwargs, clf.net)}, input_shape=[c, h, w],
                normalization=Normalization(mean, std), class_names=train.class_names))
        cfg = SimpleBitsConfig(overwrite=True, data=str(npz), out=str(work / f"{kind}.pt"), density=args.density, arch=args.arch,
                               classifier=str(pretrained) if pretrained else None,
                               lambda_sim=args.lambda_sim, steps=args.steps, batch_size=args.batch_size, sim_lr=args.sim_lr, inner_lr=args.inner_lr,
                               unet_base=args.unet_base, max_test=None, threads=args.threads, seed=args.seed, device=args.device or "cpu")
        metrics = train_simplebits(cfg)["metrics"]
        simplifier, _, _ = load_simplebits(cfg.out)
        with np.load(npz) as f:
            target, distractor = f["target_test"], f["distractor_test"]
        x = load_dataset(npz, "test").x
        sim = simplify(simplifier, to_chw(x))
        sim_hwc = (sim.permute(0, 2, 3, 1).numpy() * 255.0)
        rows.append({"kind": kind, **metrics, "original": removal_scores(x, target, distractor),
                     "simplified": removal_scores(sim_hwc, target, distractor), "wall_s": time.time() - t0})
        print(rows[-1], flush=True)
        for title, imgs in (("original", to_chw(x)), ("simplified", sim), ("target part", to_chw(target)), ("distractor part", to_chw(distractor))):
            strips.append((f"{kind}: {title}", imgs[:8].numpy()))
        save_image_rows(strips, results_dir() / f"{name}_images.png", per_row=8)
        write_result(name, {
            "settings": vars(args), "rows": rows,
            "protocol": ("joint SimpleBits training on the distractor set's train split; scores on its test split: "
                         "mean per-image Pearson correlation of the (simplified) images with the target part and "
                         "with the distractor part; acc_* / bpd_* as in train_simplebits' evaluation"),
        })


if __name__ == "__main__":
    main()
