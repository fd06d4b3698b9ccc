"""The ImageNet sample images split by class index, for the real-model work (issue 19):

* ``eval``: classes whose index is a multiple of 5 (200 images): the held-out evaluation split,
  never trained or tuned on (``bench/real_world.py`` reads them from the data folder itself);
* ``val``: index % 5 == 1 (200 images): validation carved from the training split (INT8 vs
  float32, operating-point choices);
* ``train``: the other 600: NICE training footage.

    python bench/imagenet_splits.py --data ../shared/data --out runs/imagenet --splits train val

copies ``imagenet_samples/<wnid>/`` folders of the asked splits to ``OUT/<split>/<wnid>/``
(real files: keepbits' footage reader does not follow symbolic links).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import add_data_argument, parse_args_with_data  # noqa: E402

#: split -> the class indices i it holds, by i % 5
SPLITS = {"eval": (0,), "val": (1,), "train": (2, 3, 4)}


def split_of(index: int) -> str:
    """The split of ImageNet class ``index``.

    Example:
        >>> split_of(0), split_of(6), split_of(7)
        ('eval', 'val', 'train')
    """
    return next(name for name, rests in SPLITS.items() if index % 5 in rests)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(p, "imagenet_samples/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--splits", nargs="+", choices=["train", "val"], default=["train", "val"],
                   help="splits to copy (the eval split is never copied for training)")
    args = parse_args_with_data(p)
    root = args.data / "imagenet_samples"
    classes = json.loads((root / "classes.json").read_text())
    counts = dict.fromkeys(args.splits, 0)
    for entry in classes:
        split = split_of(int(entry["index"]))
        if split in args.splits:
            target = args.out / split / entry["wnid"]
            shutil.copytree(root / entry["wnid"], target, dirs_exist_ok=True)
            counts[split] += sum(1 for f in target.iterdir() if f.is_file())
    print(json.dumps({"out": str(args.out), "images": counts}))


if __name__ == "__main__":
    main()
