"""``keepbits compare``: parity of one model across backends and artefacts, on your images.

The first ``--model`` is the reference; every other one is compared with it on the same
images (each fitted by the model's resize policy): max and mean absolute difference of the logits, ẑ and (when both have
it) x̃, argmax agreement, hard-mask agreement. A model is ``PATH`` or ``PATH@BACKEND``:

* a NICE checkpoint (``.pt``): the eager torch graph of the export (needs ``keepbits[train]``);
* a bundle: ``@auto`` (default; as ``keepbits run`` runs it), ``@functions`` (ONNX Runtime,
  CPU, the custom ops' ONNX function bodies), ``@native`` (CPU, the native kernels),
  ``@cuda``, ``@tensorrt`` (those ONNX Runtime providers); an INT8 bundle is just another bundle.

Exit 0 when every comparison meets the tolerances, 1 when one does not, 2 on input errors
(a backend this machine does not have included).

Example:
    keepbits compare --model runs/nice/nice.pt --model nice.zip@functions --model nice.zip@native \\
        --model nice-int8.zip --data photos/ --mask-atol 0.05 --min-argmax-agree 0.98
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from keepbits.cli._common import SEED, add_threads_option, number
from keepbits.errors import InputError

HELP = "compare a model across backends and artefacts (torch checkpoint, ONNX Runtime, native kernels, INT8, TensorRT); exit 1 past tolerance"


def _or_none(parse: Callable[[str], float]) -> Callable[[str], float | None]:
    """An argparse ``type``: ``parse``'s number, or None for ``none`` (no check)."""
    return lambda text: None if text.lower() == "none" else parse(text)


#: Tolerances: an absolute difference (>= 0) and a share (0..1), or 'none'.
_atol = _or_none(number(float, minimum=0))
_share = _or_none(number(float, minimum=0, maximum=1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from keepbits.cli._common import add_user_images_options

    parser.add_argument("--model", required=True, action="append", metavar="PATH[@BACKEND]",
                        help="a NICE checkpoint (.pt) or a bundle, with @auto/functions/native/cuda/tensorrt for bundles; "
                             "repeat it: the first is the reference (at least two)")
    add_user_images_options(parser)
    parser.add_argument("--num-images", type=int, default=64,
                        help="compare on a random sample of N images (seeded by --seed, class-balanced when labelled); 0: all")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the image sample")
    parser.add_argument("--logits-atol", type=_atol, default=1e-3, help="max abs difference of the logits ('none': no check)")
    parser.add_argument("--mask-atol", type=_atol, default=1e-3, help="max abs difference of ẑ ('none': no check)")
    parser.add_argument("--pixels-atol", type=_atol, default=1e-3, help="max abs difference of x̃ / simplified on 0..1 ('none': no check)")
    parser.add_argument("--min-argmax-agree", type=_share, default=1.0, help="least share of equal predicted classes ('none': no check)")
    parser.add_argument("--min-mask-agree", type=_share, default=0.999, help="least share of pixels with the same hard mask ('none': no check)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per model call")
    add_threads_option(parser, "onnxruntime")


def _pipeline(spec: str, threads: int | None) -> Any:
    """``PATH[@BACKEND]`` as a Pipeline (a bundle, by :func:`bundle_pipeline`) or, for a
    checkpoint, as a function of a bundle manifest giving its torch twin built like that bundle
    (the graph its export would write; None: the torch backend's default graph)."""
    from keepbits.runtime.parity import BUNDLE_BACKENDS, bundle_pipeline

    path, sep, backend = spec.rpartition("@")
    if not sep or Path(spec).exists():
        path, backend = spec, None
    elif backend not in BUNDLE_BACKENDS + ("torch",):
        if Path(path).exists():
            raise InputError(f"{spec}: unknown backend @{backend} (known: {', '.join(f'@{b}' for b in BUNDLE_BACKENDS + ('torch',))})")
        path, backend = spec, None
    if not Path(path).exists():
        raise InputError(f"model not found: {path}")
    if Path(path).is_file() and Path(path).suffix == ".pt":
        if backend not in (None, "torch"):
            raise InputError(f"{spec}: a checkpoint runs in torch only (no @{backend})")
        from keepbits.export import torch_pipeline

        default = torch_pipeline(path)  # built now: a checkpoint that cannot be rebuilt is refused before the images are read

        def twin(m: Any) -> Any:
            if m is None:
                return default
            return torch_pipeline(path, input_dtype=m.input_dtype, classify_on=m.classify_on, mixed_output="mixed" in m.output_names)

        return twin
    if backend == "torch":
        raise InputError(f"{spec}: @torch needs a NICE checkpoint (.pt), not a bundle")
    return bundle_pipeline(path, backend or "auto", threads)


def run(args: argparse.Namespace) -> int:
    from keepbits.data.images import load_images
    from keepbits.runtime import Pipeline
    from keepbits.runtime.parity import Tolerances, compare_pipelines

    if len(args.model) < 2:
        raise InputError("compare needs at least two --model (the first is the reference)")
    if args.num_images < 0 or args.batch_size < 1:
        raise InputError("--num-images must be >= 0 and --batch-size >= 1")
    # a checkpoint reference is built like each candidate bundle (a function of its manifest); a checkpoint
    # candidate like a bundle reference; two checkpoints as the torch backend's default graph
    reference = _pipeline(args.model[0], args.threads)
    like = reference.manifest if isinstance(reference, Pipeline) else None
    candidates = {spec: model if isinstance(model := _pipeline(spec, args.threads), Pipeline) else model(like)
                  for spec in args.model[1:]}
    images = load_images(args.data, num_images=args.num_images or None, seed=args.seed, frame_step=args.frame_step)
    tolerances = Tolerances(args.logits_atol, args.mask_atol, args.pixels_atol, args.min_argmax_agree, args.min_mask_agree)
    report = compare_pipelines(reference, candidates, images.images, tolerances, args.batch_size)
    report = {"reference": args.model[0], "data": images.source, **report}
    if not args.quiet:
        for row in report["comparisons"]:  # every check's value, failed ones first, as Polygraphy prints them
            checks = sorted(row["checks"], key=lambda c: c["passed"])
            shown = ", ".join(f"{c['name']} {c['value']:.3g} {'<=' if c['kind'] == 'max' else '>='} {c['limit']:g}"
                              + ("" if c["passed"] else " (no)") for c in checks)
            shown = shown or "no check (every tolerance is none); the differences are in the JSON"
            shown += "".join(f"; not compared: {why}" for why in row.get("skipped", []))
            print(f"keepbits compare: {row['model']} vs {args.model[0]}: {'pass' if row['passed'] else 'FAIL'}: {shown}", file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1
