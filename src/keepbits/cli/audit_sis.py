"""``keepbits audit sis``: sufficient input subsets of a data set's images, HTML + JSON report."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from keepbits.cli._common import (
    CLASSIFIER_SPEC_HELP, SEED, THRESHOLD, add_argument, add_classifier_options, add_device_option, add_frame_step_option,
    classifier_options, command_line, existing_path, non_negative_int, output_folder, positive_int,
)

HELP = "SIS audit (BackSelect/FindSIS): which pixels alone keep the prediction; writes report.html + report.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"the classifier: {CLASSIFIER_SPEC_HELP}; or a model bundle (an .onnx file "
                   "runs in ONNX Runtime here)")
    add_classifier_options(p)
    p.add_argument("--data", required=True, help="a labelled data set (as for training: .npz, idx folder, split folder, class "
                   "folders) or your footage (image folders of any nesting, videos: unlabelled, the SIS of the predicted class)")
    add_frame_step_option(p)
    p.add_argument("--out", required=True, help="output folder (report.html, report.json, orders/ for resuming)")
    p.add_argument("--split", choices=["train", "test"], default="test", help="split holding the audited images")
    add_argument(p, "--num-images", type=int, default=16, deprecated=["--images"],
                 help="audit a random sample of N images (class-balanced from the split of a labelled set; seed --seed; 0: all)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the image sample")
    p.add_argument("--threshold", type=float, default=0.9, help="τ for the figures")
    p.add_argument("--thresholds", type=THRESHOLD, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
                   help="τ values for the size curves (images whose confidence is below the smallest τ here and --threshold "
                        "have no SIS and are not BackSelected)")
    p.add_argument("--method", choices=["auto", "incremental", "plain", "gradient"], default="auto",
                   help="exact BackSelect (auto: incremental where the torch model, or the ONNX graph's torch twin, has local ops "
                        "and that is faster, else plain) or batched gradient BackSelect")
    p.add_argument("--k", type=int, default=16, help="pixels masked per gradient BackSelect iteration")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images (or masked copies) per model call")
    p.add_argument("--show", type=non_negative_int, default=12, help="images shown in the report")
    p.add_argument("--partial", action="store_true",
                   help="compute nothing: report on the BackSelect runs an audit with these same arguments has finished so far "
                        "in --out (running or stopped), as report_partial.html + .json")
    add_device_option(p)


#: Above this many pixels (64×64) an exact audit is warned about: p(p+1)/2 candidate forward passes per image.
EXACT_PIXELS_HINT = 64 * 64


def run(args: argparse.Namespace) -> int:
    existing_path(args.data, "data path")
    from keepbits.audit import load_model
    from keepbits.audit.sis_report import sis_audit
    from keepbits.data.images import model_images
    from keepbits.errors import InputError
    from keepbits.runtime.evaluate import labels_for_model

    if not 0 < args.threshold <= 1:
        raise InputError(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.num_images < 0:
        raise InputError(f"--num-images must be >= 0, got {args.num_images}")
    if args.method == "gradient" and args.k < 1:
        raise InputError(f"--k (pixels per gradient step) must be >= 1, got {args.k}")
    # a folder whose orders/ holds chunk files is an SIS audit to resume (they refuse another audit's runs);
    # any other folder's report files are never overwritten (an overinterpretation audit's orders/ holds folders)
    resumable = any((Path(args.out) / "orders").glob("chunk_*.json")) or args.partial
    output_folder(args.out, writes=("models",) + (() if resumable else ("report.html", "report.json")))  # models/: an overinterpretation audit's
    options = classifier_options(args)
    bundle = Path(args.model).exists() and not args.model.endswith((".pt", ".onnx"))
    if bundle and (options["weights"] or options["kwargs"] or options["preprocessing"]):
        raise InputError(f"{args.model}: a bundle records its own preprocessing; --classifier-weights/--classifier-kwargs and "
                         "preprocessing options apply to checkpoints, registry names, package.module:factory and .onnx files")
    model = load_model(args.model, **options)
    pixels = model.input_shape[1] * model.input_shape[2]
    if (args.method != "gradient" and not args.partial and pixels > EXACT_PIXELS_HINT and not args.quiet
            and os.environ.get("RANK", "0") == "0"):
        print(f"keepbits: warning: exact BackSelect of {model.input_shape[1]}×{model.input_shape[2]} images evaluates "
              f"p(p+1)/2 = {pixels * (pixels + 1) // 2:,} candidates per image; at this size --method gradient "
              f"(p/k gradient steps, --k {args.k}: {-(-pixels // args.k):,}) is the practical one", file=sys.stderr)
    drawn = model_images(args.data, model.preprocessing, split=args.split, num_images=args.num_images or None,
                         seed=args.seed, frame_step=args.frame_step, channels=model.input_shape[0])
    labels = drawn.labels  # as the model's class indices where it names its classes; else the data's own
    if model.class_names:
        labels, _ = labels_for_model(labels, drawn.class_names, model.class_names, args.data)
    provenance = {"data": args.data, "split": args.split, "sample": drawn.source, "seed": args.seed, "command": command_line()}
    data = sis_audit(model, drawn.images, labels, args.out, args.threshold, args.thresholds, args.method, args.k,
                     args.batch_size, args.show, progress=not args.quiet, device=args.device, partial=args.partial,
                     meta=provenance, image_names=drawn.names)
    if int(os.environ.get("RANK", "0")) == 0:
        report = "report_partial.html" if args.partial else "report.html"
        print(json.dumps({**data["summary"], "report": os.path.join(args.out, report)}, indent=2))
    return 0
