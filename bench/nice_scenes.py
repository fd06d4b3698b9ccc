"""NICE run 3: cluttered scenes. A CIFAR-10 object upscaled ×2 (64×64, bilinear) pasted at a
random position on a random 256×256 crop of a Kodak image; label = the object's class.
Kodak kodim01–16 give the train backgrounds and CIFAR train objects, kodim17–24 the test
backgrounds and CIFAR test objects.

Protocol:

* **Splits.** The scene classifier (``resnet20_scan`` from a CIFAR-10 ResNet-20, or ``--arch``)
  and NICE hold out the same stratified validation split of the training scenes
  (``--val-fraction``, ``--seed``). Every choice is made on ``--max-val`` of those scenes; the
  test scenes are evaluated once, for the chosen settings.
* **Settings, chosen on validation.** NICE (``--generator``, b, λ2, target kept fraction) in
  three families: with the saliency warm start then Eq. 10 (``warm``), from NICE's own start
  (``cold``, Eq. 10 alone), and the warm start alone (``warm_only``, no Eq. 10). For ``warm`` and
  ``cold`` the Eq. 10 learning rate is chosen among ``--lrs`` by ``nice_common.choose`` (best
  validation accuracy of the binary mask among settings keeping at most ``--max-kept``). Then,
  on validation, the payload quality: the cheapest lossy keepbits payload (JPEG/WebP kept
  blocks, ``--qualities``) whose accuracy is within ``--tolerance`` of the scene's, and the
  scene's own codec setting: its cheapest JPEG/WebP reaching that payload's accuracy.
* **What is compared (test).** Lossless with lossless: the keepbits lossless payload
  (``keepbits.codec.encode``, real bytes: raw background, mask bits, PNG kept blocks written by
  keepbits' fast default PNG writer) against PNG of the scene at zlib level 9 (the smaller of the
  two writers on these scenes, so the ratio is conservative). Lossy with lossy: the chosen lossy payload against the chosen scene
  JPEG/WebP. Accuracy with 95 % CIs, and the paired difference from the scene with its CI. The
  whole test rate–accuracy curves (fine quality grid) are kept, with the scene's cheapest
  coding reaching the payload's accuracy and the ends of its CI.
* **Controls at NICE's binary budget** (same pixels per scene as ẑ > 0.5): smoothed gradient
  saliency of the predicted class at test time (the warm start's map, box filter
  ``--warmup-smooth``; with payload bytes), gradient saliency, random pixels; and the soft ẑ apart.

Writes ``bench/results/nice_scenes[_TAG].json`` and ``nice_scenes[_TAG]_rate.png``; the scene
sets and checkpoints go to ``--runs`` (never committed). ``--summarise RUN ...`` instead reads
finished runs (one or more per seed) and writes ``nice_scenes_seeds.json``: per family, each test figure
per seed with mean, sample sd and range.

    nice -n 10 python bench/nice_scenes.py --classifier-init runs/resnet20_val/last.pt --num-train 8000 --num-test 1000
    python bench/nice_scenes.py --summarise nice_scenes nice_scenes_s1 nice_scenes_s2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _results import add_data_argument, require_data, results_dir, write_result
from keepbits.audit.overinterpretation import mean_ci
from keepbits.data import load_dataset
from keepbits.training.checkpoint import load_checkpoint
from keepbits.training.data import TensorImages
from keepbits.training.nice import NiceConfig, gradient_saliency, load_nice, train_nice
from keepbits.training.nice_eval import Evaluation, code_images
from nice_common import choose, ensure_classifier, plot_curves, spread, validation_images

SCENE, OBJECT = 256, 64
LOSSY = ("jpeg", "webp")


def make_scenes(kodak: Path, cifar: Path, split: str, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` scenes (uint8 N×256×256×3) with labels, deterministic in ``seed``."""
    from PIL import Image

    ids = range(1, 17) if split == "train" else range(17, 25)
    backgrounds = [np.asarray(Image.open(kodak / f"kodim{i:02d}.png").convert("RGB")) for i in ids]
    objects = load_dataset(cifar, split)
    rng = np.random.default_rng(seed)
    x = np.empty((n, SCENE, SCENE, 3), np.uint8)
    y = np.empty(n, np.int64)
    for k in range(n):
        bg = backgrounds[rng.integers(len(backgrounds))]
        top, left = rng.integers(bg.shape[0] - SCENE + 1), rng.integers(bg.shape[1] - SCENE + 1)
        x[k] = bg[top : top + SCENE, left : left + SCENE]
        j = rng.integers(len(objects))
        obj = np.asarray(Image.fromarray(objects.x[j]).resize((OBJECT, OBJECT), Image.BILINEAR))
        r, c = rng.integers(SCENE - OBJECT + 1), rng.integers(SCENE - OBJECT + 1)
        x[k, r : r + OBJECT, c : c + OBJECT] = obj
        y[k] = objects.y[j]
    return {"x": x, "y": y, "class_names": np.array(objects.class_names)}


def scene_curve(ev: Evaluation, qualities: list[int]) -> list[dict]:
    """The scenes themselves: PNG and JPEG/WebP at ``qualities`` (bytes, accuracy)."""
    return ev.codec_rows(ev.dataset.x, qualities)


def cheapest_reaching(rows: list[dict], accuracy: float, codecs: tuple[str, ...] = LOSSY) -> dict | None:
    """The row with the fewest bytes among ``codecs`` whose accuracy reaches ``accuracy``."""
    ok = [r for r in rows if r["codec"] in codecs and r["accuracy"] >= accuracy]
    return min(ok, key=lambda r: r["bytes_per_image"]) if ok else None


def smoothed_saliency(classifier: torch.nn.Module, images, mean, std, smooth: int, batch_size: int = 64) -> torch.Tensor:
    """N×H×W box-smoothed gradient saliency of the predicted class (no labels): the warm start's map at test time."""
    return torch.cat([gradient_saliency(classifier, x, None, smooth) for x, _ in TensorImages(images, mean, std).batches(batch_size)])


def plot_rates(results: dict[str, dict], path: Path, num_scenes: int) -> None:
    """Test rate–accuracy curves, one series per family and codec (payload blocks, then the scene)."""
    def series(rows: list[dict], codec: str) -> tuple[list[float], list[float]]:
        picked = [r for r in rows if r["codec"] == codec]
        return [r["bytes_per_image"] for r in picked], [r["accuracy"] for r in picked]

    curves = {f"NICE {family}: payload, {codec} blocks": series(entry["test_payload_curve"], codec) for family, entry in results.items() for codec in LOSSY}
    curves.update({f"scene {codec}": series(next(iter(results.values()))["test_scene_curve"], codec) for codec in LOSSY})
    plot_curves(path, curves, "bytes per scene", "test accuracy", f"Kodak+CIFAR scenes, {num_scenes} test scenes", logx=True)


def seed_summary(runs: list[dict]) -> dict[str, dict]:
    """Per family: the test figures of each seed whose run took it to the test, with their spread
    (:func:`nice_common.spread`); differences are paired within a seed's test scenes. Runs of the
    same seed are merged (a family added later in its own result file); a family that reached the
    test in fewer than two seeds has no spread and is left out.

    Example:
        >>> def run(seed, acc, ctrl, family="warm"):
        ...     pay = lambda a: {"bytes_per_image": 100.0, "accuracy": {"mean": a}, "minus_scene": {"mean": a - 0.6}}
        ...     entry = {"kept_fraction": 0.1, "soft_accuracy": acc, "scene": {"accuracy": {"mean": 0.6}, "png_bytes_per_image": 500.0},
        ...              "lossless": {"nice_payload": pay(acc), "control_payload": pay(ctrl), "ratio_vs_scene_png": 5.0},
        ...              "equal_budget_accuracy": {"nice": acc, "random": 0.1}}
        ...     return {"protocol": {"scenes": f"8 train / 2 test, seeds {seed}/{seed + 1}"}, "test": {family: entry}}
        >>> s = seed_summary([run(0, 0.65, 0.64), run(1, 0.61, 0.62), run(1, 0.5, 0.4, "cold"), run(2, 0.3, 0.2, "cold")])
        >>> s["warm"]["seeds"], round(s["warm"]["nice_minus_control"]["mean"], 3), s["cold"]["seeds"]
        ([0, 1], 0.0, [1, 2])
    """
    by_seed: dict[int, dict[str, dict]] = {}
    for r in runs:
        seed = int(r["protocol"]["scenes"].split("seeds ")[1].split("/")[0])
        tested = by_seed.setdefault(seed, {})
        if twice := sorted(set(tested) & set(r["test"])):
            raise ValueError(f"seed {seed}: family {', '.join(twice)} reached the test in two result files")
        tested.update(r["test"])
    families = list(dict.fromkeys(f for tested in by_seed.values() for f in tested))
    out = {}
    for family in families:
        seeds = sorted(s for s, tested in by_seed.items() if family in tested)
        if len(seeds) < 2:
            continue
        entries = [by_seed[s][family] for s in seeds]

        def over(get) -> dict:
            return spread([get(e) for e in entries])

        out[family] = {
            "seeds": seeds,
            "kept_fraction": over(lambda e: e["kept_fraction"]),
            "scene_accuracy": over(lambda e: e["scene"]["accuracy"]["mean"]),
            "scene_png_bytes": over(lambda e: e["scene"]["png_bytes_per_image"]),
            "payload_bytes": over(lambda e: e["lossless"]["nice_payload"]["bytes_per_image"]),
            "payload_accuracy": over(lambda e: e["lossless"]["nice_payload"]["accuracy"]["mean"]),
            "payload_minus_scene": over(lambda e: e["lossless"]["nice_payload"]["minus_scene"]["mean"]),
            "ratio_vs_scene_png": over(lambda e: e["lossless"]["ratio_vs_scene_png"]),
            "control_accuracy": over(lambda e: e["lossless"]["control_payload"]["accuracy"]["mean"]),
            "nice_minus_control": over(lambda e: e["lossless"]["nice_payload"]["accuracy"]["mean"] - e["lossless"]["control_payload"]["accuracy"]["mean"]),
            "equal_budget_accuracy": {m: over(lambda e, m=m: e["equal_budget_accuracy"][m]) for m in entries[0]["equal_budget_accuracy"]},
            "soft_accuracy": over(lambda e: e["soft_accuracy"]),
        }
    return out


def summarise(names: list[str]) -> int:
    """Write ``nice_scenes_seeds.json`` from the named result files (one or more per seed)."""
    runs = [json.loads((results_dir() / f"{n}.json").read_text()) for n in names]
    summary = seed_summary(runs)
    print(write_result("nice_scenes_seeds", {"runs": names, "pilots_validation": {n: r["pilots_validation"] for n, r in zip(names, runs)},
                                             "statistics": "per seed: test figures of the setting chosen on that seed's validation scenes; "
                                                           "mean, sample sd (n - 1) and range over the seeds",
                                             "families": summary}))
    for family, s in summary.items():
        print(f"{family}: seeds {s['seeds']} kept {s['kept_fraction']['mean']:.3f} ratio {s['ratio_vs_scene_png']['mean']:.2f}x "
              f"payload-scene {s['payload_minus_scene']['mean']:+.3f} (min {s['payload_minus_scene']['min']:+.3f}) "
              f"nice-control {s['nice_minus_control']['mean']:+.3f} ± {s['nice_minus_control']['std']:.3f}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(p, "kodak/ and cifar10/")
    p.add_argument("--runs", type=Path, default=Path("runs/nice"))
    p.add_argument("--num-train", type=int, default=8000)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--classifier", default=None, help="scene classifier trained with the same --val-fraction and --seed; trained into --runs when missing")
    p.add_argument("--arch", default="resnet20_scan", help="scene classifier (resnet20_scan: the CIFAR-10 ResNet-20 slid over the scene at ½ resolution)")
    p.add_argument("--classifier-init", default=None, help="start the scene classifier from this checkpoint (the CIFAR-10 resnet20 for resnet20_scan)")
    p.add_argument("--classifier-epochs", type=int, default=2)
    p.add_argument("--classifier-lr", type=float, default=0.02)
    p.add_argument("--generator", default="nice_fast")
    p.add_argument("--block-size", type=int, default=256, help="b (256 = dropped pixels become the scene mean)")
    p.add_argument("--target-fraction", type=float, default=0.1, help="kept fraction NICE is trained to (λ1 adapted)")
    p.add_argument("--target-lambda0", type=float, default=1.0)
    p.add_argument("--lambda-smooth", type=float, default=1.0)
    p.add_argument("--warmup-steps", type=int, default=300, help="saliency warm start steps of the warm and warm_only families")
    p.add_argument("--warmup-smooth", type=int, default=9, help="box filter of the warm start and of its test-time control")
    p.add_argument("--warmup-lr", type=float, default=1e-2)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-4], help="Eq. 10 learning rates (chosen on validation per family)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--nice-max-train", type=int, default=4000, help="train each generator on a seeded sample of this many scenes")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--max-val", type=int, default=400, help="validation scenes the choices are made on")
    p.add_argument("--max-kept", type=float, default=0.15, help="selection rule: pilots keeping at most this fraction")
    p.add_argument("--tolerance", type=float, default=0.01, help="payload quality: cheapest within this accuracy of the scene (validation)")
    p.add_argument("--qualities", type=int, nargs="+", default=list(range(5, 100, 5)), help="JPEG/WebP quality grid (scenes and payloads)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="evaluate existing generator checkpoints under --runs instead of retraining")
    p.add_argument("--families", nargs="+", choices=("warm", "cold", "warm_only"), default=["warm", "cold", "warm_only"],
                   help="NICE families to train (a replicate seed may run only the ones that reached the test)")
    p.add_argument("--test-curves", action=argparse.BooleanOptionalAction, default=True,
                   help="also code the test scenes and payloads over the whole quality grid (descriptive curves and the rate plot)")
    p.add_argument("--summarise", nargs="+", metavar="RUN", help="only summarise these finished runs (bench/results/RUN.json, one or more per seed)")
    args = p.parse_args()
    if args.summarise:
        missing = [n for n in args.summarise if not (results_dir() / f"{n}.json").is_file()]
        if missing:
            p.error(f"no result file for: {', '.join(missing)}")
        try:
            return summarise(args.summarise)
        except ValueError as e:
            p.error(str(e))
    require_data(p, args.data, "kodak", "cifar10")
    name = f"nice_scenes{'_' + args.tag if args.tag else ''}"
    torch.set_num_threads(args.threads)
    started = time.time()
    scenes = args.runs / f"scenes_{args.num_train}_{args.num_test}_s{args.seed}"
    scenes.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", args.num_train, args.seed), ("test", args.num_test, args.seed + 1)):
        if not (scenes / f"{split}.npz").exists():
            np.savez(scenes / f"{split}.npz", **make_scenes(args.data / "kodak", args.data / "cifar10", split, n, seed))
    clf_path = ensure_classifier(scenes, args.arch, args.runs / f"scenes_{args.arch}", args.classifier, epochs=args.classifier_epochs,
                                 optimizer="sgd", lr=args.classifier_lr, batch_size=64, val_fraction=args.val_fraction, seed=args.seed,
                                 init=args.classifier_init)
    val = validation_images(scenes, args.val_fraction, args.seed, args.max_val)
    test = load_dataset(scenes, "test")

    families = {"warm": (args.warmup_steps, args.epochs, args.lrs), "cold": (0, args.epochs, args.lrs), "warm_only": (args.warmup_steps, 0, [args.lrs[0]])}
    families = {f: v for f, v in families.items() if f in args.families}
    scene_curves: dict[str, list[dict]] = {}  # the scenes' own codec rows depend on the classifier only: once per image set

    def scenes_coded(split: str, ev: Evaluation) -> list[dict]:
        if split not in scene_curves:
            scene_curves[split] = scene_curve(ev, args.qualities)
        return scene_curves[split]

    done: set[Path] = set()  # each generator trains once per run (pilot, then test)

    def trained(family: str, lr: float) -> str:
        warmup, epochs, _ = families[family]
        out = args.runs / f"scenes_{args.generator}_{family}_lr{lr:g}{'_' + args.tag if args.tag else ''}"
        if out not in done and not (args.reuse and (out / "nice.pt").exists()):
            train_nice(NiceConfig(overwrite=True, data=str(scenes), classifier=clf_path, out=str(out), generator=args.generator, block_size=args.block_size,
                                  lambda_l0=args.target_lambda0, target_fraction=args.target_fraction, lambda_smooth=args.lambda_smooth, lr=lr,
                                  warmup_steps=warmup, warmup_smooth=args.warmup_smooth, warmup_lr=args.warmup_lr, epochs=epochs,
                                  batch_size=args.batch_size, max_train=args.nice_max_train, val_fraction=args.val_fraction, seed=args.seed,
                                  progress=False, command=" ".join(sys.argv)))
        done.add(out)
        return str(out / "nice.pt")

    def evaluation(path: str, images) -> Evaluation:
        gen, clf, ckpt = load_nice(path)
        norm = ckpt.normalization
        return Evaluation(gen, clf, ckpt, images, seed=args.seed, batch_size=64,
                          extra_scores={"saliency_smoothed": smoothed_saliency(clf, images, norm.mean, norm.std, args.warmup_smooth)})

    # 1. validation: Eq. 10 learning rate per family, then the payload's and the scene's lossy settings
    b = args.block_size
    pilots, chosen = [], {}
    for family, (_, _, lrs) in families.items():
        rows = []
        for lr in lrs:
            ev = evaluation(trained(family, lr), val)
            rows.append({"family": family, "lr": lr, "kept_fraction": float(ev.masks["nice"].mean()), "mean_mask": float(ev.z_hat.mean()),
                         "val": {"nice": {"accuracy": ev.accuracy(ev.composed(ev.masks["nice"], b))}}, "_ev": ev})
            print(f"pilot {family} lr={lr:g}: val kept {rows[-1]['kept_fraction']:.3f} acc {rows[-1]['val']['nice']['accuracy']:.3f}", flush=True)
        best = choose(rows, args.max_kept)
        if best is not None:
            ev = best["_ev"]
            scene_rows = scenes_coded("val", ev)
            payloads = ev.payload_rows(ev.masks["nice"], b, args.qualities)
            floor = scene_rows[0]["accuracy"] - args.tolerance
            lossy_payload = min((r for r in payloads if r["codec"] in LOSSY and r["accuracy"] >= floor), key=lambda r: r["bytes_per_image"], default=None)
            scene = cheapest_reaching(scene_rows, lossy_payload["accuracy"]) if lossy_payload else None
            chosen[family] = {"lr": best["lr"], "payload": lossy_payload, "scene_codec": scene, "val_scene_accuracy": scene_rows[0]["accuracy"],
                              "val_payloads": payloads, "val_scene_codecs": scene_rows}
            print(f"chosen {family}: lr {best['lr']:g}, payload {lossy_payload and (lossy_payload['codec'], lossy_payload['quality'])}, "
                  f"scene {scene and (scene['codec'], scene['quality'])}", flush=True)
        pilots += [{k: v for k, v in r.items() if k != "_ev"} for r in rows]

    # 2. test, once per chosen setting
    results = {}
    scene_png = float(code_images(test.x, "png")[0].mean()) if chosen else float("nan")  # the same scenes for every family
    for family, choice in chosen.items():
        ev = evaluation(trained(family, choice["lr"]), test)
        scene_correct = ev.correct(test.x)

        def coded(mask: torch.Tensor, codec: str, quality: int) -> dict:
            sizes, decoded = ev.payload(mask, b, codec, quality)
            correct = ev.correct(decoded)
            return {"codec": codec, "quality": quality, "bytes_per_image": float(sizes.mean()), "accuracy": mean_ci(correct.astype(float)),
                    "minus_scene": mean_ci(correct.astype(float) - scene_correct)}

        def scene_coded(codec: str, quality: int) -> dict:
            sizes, decoded = code_images(test.x, codec, quality)
            return {"codec": codec, "quality": quality, "bytes_per_image": float(sizes.mean()), "accuracy": mean_ci(ev.correct(decoded).astype(float))}

        entry = {"lr": choice["lr"], "kept_fraction": float(ev.masks["nice"].mean()), "mean_mask": float(ev.z_hat.mean()),
                 "scene": {"png_bytes_per_image": scene_png, "accuracy": mean_ci(scene_correct.astype(float))}}
        entry["lossless"] = {"nice_payload": coded(ev.masks["nice"], "png", 90), "control_payload": coded(ev.masks["saliency_smoothed"], "png", 90)}
        entry["lossless"]["ratio_vs_scene_png"] = scene_png / entry["lossless"]["nice_payload"]["bytes_per_image"]
        if choice["payload"] and choice["scene_codec"]:
            q = (choice["payload"]["codec"], choice["payload"]["quality"])
            nice_lossy, scene_lossy = coded(ev.masks["nice"], *q), scene_coded(choice["scene_codec"]["codec"], choice["scene_codec"]["quality"])
            entry["lossy"] = {"nice_payload": nice_lossy, "control_payload": coded(ev.masks["saliency_smoothed"], *q), "scene": scene_lossy,
                              "ratio_vs_scene": scene_lossy["bytes_per_image"] / nice_lossy["bytes_per_image"],
                              "nice_minus_scene_codec_accuracy": nice_lossy["accuracy"]["mean"] - scene_lossy["accuracy"]["mean"]}
        entry["equal_budget_accuracy"] = {name: ev.accuracy(ev.composed(ev.masks[name], b)) for name in ("nice", "saliency_smoothed", "saliency_topk", "random")}
        entry["soft_accuracy"] = ev.accuracy(ev.composed(ev.z_hat, b))
        # the whole test curves (fine grid) and the scene coding the curve matches, at the payload's accuracy and at the ends of its CI
        if args.test_curves:
            entry["test_payload_curve"] = ev.payload_rows(ev.masks["nice"], b, args.qualities)
            entry["test_scene_curve"] = scenes_coded("test", ev)
            if "lossy" in entry:
                a = entry["lossy"]["nice_payload"]["accuracy"]
                entry["lossy"]["test_curve_match"] = {k: cheapest_reaching(entry["test_scene_curve"], a["mean"] + d)
                                                      for k, d in (("at_accuracy", 0.0), ("at_ci_low", -a["ci95"]), ("at_ci_high", a["ci95"]))}
        results[family] = entry
        print(f"test {family}: kept {entry['kept_fraction']:.3f}; lossless {entry['lossless']['ratio_vs_scene_png']:.1f}x vs scene PNG"
              + (f"; lossy {entry['lossy']['ratio_vs_scene']:.1f}x vs scene {choice['scene_codec']['codec']}" if "lossy" in entry else ""), flush=True)
    if results and args.test_curves:
        plot_rates(results, results_dir() / f"{name}_rate.png", len(test))
    payload = {
        "protocol": {"scenes": f"{args.num_train} train / {args.num_test} test, seeds {args.seed}/{args.seed + 1}",
                     "backgrounds": "kodim01-16 train, kodim17-24 test, random 256x256 crops",
                     "objects": "CIFAR-10 train_20k (train) / test (test), bilinear x2 to 64x64, random position",
                     "classifier": f"{args.arch} ({clf_path})", "generator": args.generator, "block_size": b, "target_fraction": args.target_fraction,
                     "lambda_smooth": args.lambda_smooth, "epochs": args.epochs, "lrs": args.lrs, "families": args.families,
                     "test_curves": args.test_curves, "nice_train_scenes": args.nice_max_train,
                     "val_fraction": args.val_fraction, "validation_scenes": len(val), "test_scenes": len(test), "qualities": args.qualities,
                     "warm_start": {"steps": args.warmup_steps, "smooth_px": args.warmup_smooth, "lr": args.warmup_lr},
                     "selection": f"on validation scenes: Eq. 10 lr by nice_common.choose (max kept {args.max_kept}); payload = cheapest JPEG/WebP-block "
                                  f"keepbits payload within {args.tolerance} of the scene's accuracy; scene codec = the scene's cheapest JPEG/WebP "
                                  "reaching that payload's accuracy; test evaluated once for these",
                     "bytes": "keepbits.codec.encode payloads (blocks mode, real bytes) and whole-scene PNG/JPEG/WebP by keepbits.codec.encode_image"},
        "classifier_metrics": {k: v for k, v in load_checkpoint(clf_path).metrics.items() if k != "history"},
        "pilots_validation": pilots,
        "chosen_on_validation": chosen,
        "test": results,
        "wall_time_s": round(time.time() - started, 1),
    }
    print(write_result(name, payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
