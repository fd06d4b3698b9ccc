"""``keepbits export onnx``: a NICE or SimpleBits checkpoint -> a model bundle (``model.onnx`` + ``manifest.json``)."""
from __future__ import annotations

import argparse
import json

from keepbits.bundle import MAX_OPSET, MIN_OPSET
from keepbits.cli._common import add_argument, command_line, existing_path

HELP = ("export a NICE or SimpleBits checkpoint to a model bundle (ONNX graph image -> logits, mask, mixed; "
        "or logits, simplified; docs/bundle.md)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_argument(p, "--model", required=True, deprecated=["checkpoint"],
                 help="nice or simplebits checkpoint (.pt) written by `keepbits train nice` / `train simplebits`")
    p.add_argument("--out", required=True, help="bundle folder, or a .zip file for a one-file bundle")
    p.add_argument("--input", dest="input_dtype", choices=["uint8", "float32"], default="uint8",
                   help="uint8: N×H×W×C pixels 0..255; float32: N×C×H×W on 0..1")
    p.add_argument("--classify-on", choices=["original", "mixed"], default=None,
                   help="NICE: feed the classifier the original image (default) or the mixed-resolution image x̃ "
                        "(a SimpleBits classifier always sees the simplified image)")
    p.add_argument("--unfused", action="store_true", help="emit HardConcreteMask + MixedResCompose instead of the fused MaskCompose")
    p.add_argument("--no-mixed-output", action="store_true",
                   help="NICE: outputs logits and mask only, for deployment (the runtime never reads x̃; ONNX Runtime would "
                        "compute it on every frame anyway)")
    p.add_argument("--target", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                   help="tensorrt: custom nodes without ONNX function bodies (TensorRT plugins replace them)")
    p.add_argument("--opset", type=int, choices=range(MIN_OPSET, MAX_OPSET + 1), default=MIN_OPSET, metavar="N",
                   help=f"default-domain ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing keepbits bundle at --out (never another file or folder)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs torch check on a random batch")


def run(args: argparse.Namespace) -> int:
    existing_path(args.model, "checkpoint")
    from keepbits.export import export_onnx

    bundle = export_onnx(
        args.model, args.out, input_dtype=args.input_dtype, classify_on=args.classify_on, fused=not args.unfused,
        mixed_output=not args.no_mixed_output, target=args.target, opset=args.opset, overwrite=args.force, verify=not args.no_verify, command=command_line(),
    )
    m = bundle.manifest
    print(json.dumps({"bundle": str(bundle.source), "digest": bundle.digest, "input": f"{m.input_layout} {m.input_dtype}",
                      "explain": m.explain, "dynamic_size": m.dynamic_size, "custom_ops": m.custom_ops, "target": m.target}, indent=2))
    return 0
