"""SimpleBits condensation (S4.3, Eq. 7) on CPU-sized runs: accuracy of fresh classifiers
trained only on the condensed set vs bpd of the condensed images, for several λ_sim and
1 / 10 images per class, next to the same number of random real images (the starting point).

    OMP_WAIT_POLICY=PASSIVE nice -n 5 .venv/bin/python bench/simplebits_condense.py --dataset mnist

Writes ``bench/results/simplebits_condense_<dataset>.json`` after every row (partial results
survive) and ``..._images.png`` (one row of synthetic images per setting).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import add_data_argument, require_data, results_dir, save_image_rows, write_result  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_argument(p, "mnist/ and cifar10/")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "cifar10"])
    p.add_argument("--density", default=None, help="density checkpoint (default: the shipped CIFAR-10 Glow)")
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10], help="synthetic images per class")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.3, 1.0, 3.0])
    p.add_argument("--outer", type=int, default=40)
    p.add_argument("--inner", type=int, default=5)
    p.add_argument("--net-steps", type=int, default=5)
    p.add_argument("--real-batch", type=int, default=64)
    p.add_argument("--lr-images", type=float, default=0.1)
    p.add_argument("--image-optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--max-train", type=int, default=10000, help="real training images to condense from")
    p.add_argument("--max-test", type=int, default=2000)
    p.add_argument("--eval-steps", type=int, default=300, help="AdamW steps of each fresh evaluation classifier")
    p.add_argument("--eval-seeds", type=int, default=3, help="fresh classifiers per setting (mean ± sd)")
    p.add_argument("--seed", type=int, default=0,
                   help="condensation seed: the starting real images and the condensation's own randomness (data samples stay fixed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default=None, help="torch device of the condensation, e.g. cuda (fresh classifiers use CUDA when present)")
    args = p.parse_args()
    require_data(p, args.data, args.dataset)

    import torch

    from keepbits.data import channel_stats, load_dataset
    from keepbits.training.condensation import CondensationConfig, condense, initial_indices
    from keepbits.training.density import images_to_unit, load_density
    from keepbits.core import accuracy
    from keepbits.training.classifier import fit_classifier, predict_logits
    from keepbits.training.data import TensorArrays
    from keepbits.training.simplebits import build_classifier, mean_bpd, retrain_config

    torch.set_num_threads(args.threads)
    root = Path(args.data) / args.dataset
    train, test = load_dataset(root, "train").sample(args.max_train), load_dataset(root, "test").sample(args.max_test)
    xtr, ytr = images_to_unit(train.x), torch.from_numpy(train.y).long()
    xte, yte = images_to_unit(test.x), torch.from_numpy(test.y).long()
    mean, std = channel_stats(train.x)
    flow = load_density(args.density).to(args.device or "cpu")
    c, h, w = train.shape_chw
    flow_device = args.device or "cpu"
    name = f"simplebits_condense_{args.dataset}{'_' + args.tag if args.tag else ''}"
    rows: list[dict] = []
    strips: list[tuple[str, np.ndarray]] = []

    def make_net() -> torch.nn.Module:
        return build_classifier("convnet3", c, train.num_classes, (h, w), mean, std)[0]

    def evaluate(x_syn: torch.Tensor, y_syn: torch.Tensor) -> tuple[float, float]:
        accs = []
        for seed in range(args.eval_seeds):
            torch.manual_seed(seed)
            clf = fit_classifier(make_net(), TensorArrays(x_syn, y_syn), retrain_config(args.eval_steps, batch_size=256, lr=1e-3, seed=seed))
            accs.append(accuracy(predict_logits(clf, xte), yte))
        return float(np.mean(accs)), float(np.std(accs))

    def record(row: dict, title: str, images: torch.Tensor) -> None:
        rows.append(row)
        strips.append((title, images[:: max(1, row["ipc"])].numpy()))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        write_result(name, {"settings": vars(args), "sizes": {"real_train": len(train), "test": len(test)}, "rows": rows,
                            "protocol": ("accuracy = mean ± sd over fresh ConvNet-3 classifiers trained only on the listed images, "
                                         "tested on the real test images; bpd = mean bpd of the listed images under the density model")})
        save_image_rows(strips, results_dir() / f"{name}_images.png")

    for ipc in args.ipc:
        pick = initial_indices(ytr, train.num_classes, ipc, seed=args.seed)  # the real images condensation starts from
        acc, sd = evaluate(xtr[pick], ytr[pick])
        record({"method": "random real", "ipc": ipc, "bpd": mean_bpd(flow, xtr[pick]), "accuracy": acc, "accuracy_sd": sd}, f"real ipc={ipc}", xtr[pick])
        for lam in args.lambdas:
            t0 = time.time()
            cfg = CondensationConfig(images_per_class=ipc, lambda_sim=lam, outer_loops=args.outer, inner_loops=args.inner,
                                     net_steps=args.net_steps, real_batch=args.real_batch, lr_images=args.lr_images,
                                     image_optimizer=args.image_optimizer, seed=args.seed)
            torch.manual_seed(args.seed)
            x_syn, y_syn = condense(xtr.to(flow_device), ytr.to(flow_device), train.num_classes, make_net, cfg, bpd=flow.bpd)
            x_syn, y_syn = x_syn.cpu(), y_syn.cpu()
            wall = time.time() - t0
            acc, sd = evaluate(x_syn, y_syn)
            record({"method": "condensed", "ipc": ipc, "lambda_sim": lam, "bpd": mean_bpd(flow, x_syn), "accuracy": acc,
                    "accuracy_sd": sd, "condense_wall_s": wall}, f"lam={lam:g} ipc={ipc}", x_syn)


if __name__ == "__main__":
    main()
