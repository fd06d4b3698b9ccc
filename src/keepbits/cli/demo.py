"""``keepbits demo``: a real pretrained classifier on real camera footage, nothing downloaded, no torch.

The bundled model is EfficientNet-Lite0 (ImageNet-1k) with a NICE mask generator (``nice_fast``)
trained on unlabelled natural images and video frames (``docs/real_models.md`` gives the
commands); the bundled clip is five seconds of ``bottle-detection.mp4`` from the Intel IoT
DevKit sample videos (CC-BY 4.0, ``keepbits/assets/LICENSE-CC-BY-4.0``). Each frame is
classified, masked and packed into a payload; the demo writes the annotated video (the kept
pixels over the objects, the ImageNet label), the payloads and a summary that compares the
payload's bytes with JPEG and WebP files of the same model-size frames at matched prediction
agreement (each file and each payload decoded and classified again, ``keepbits.runtime.evaluate``).
The earlier MNIST demo's assets made room for these (``docs/runtime.md`` still builds them).

``--out`` is a new or empty folder, or an earlier demo's (its ``summary.json`` says
``"written_by": "keepbits demo"``), whose output a rerun replaces; any other folder is refused.
Exit codes are ``keepbits run``'s (:data:`keepbits.cli.run.EXIT_CODES`): 3 when the source gave
no frame, and so on.

Example:
    keepbits demo --out keepbits-demo
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from keepbits.errors import InputError

log = logging.getLogger("keepbits")
HELP = "run the bundled EfficientNet-Lite0 + NICE model on a bundled real clip: annotated video, payloads, bytes vs JPEG/WebP"

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_BUNDLE = ASSETS / "lite0_nice_bundle.zip"
DEMO_STREAM = ASSETS / "bottle_clip.mp4"
#: Credit the clip's license asks for, printed with the results and stored in the summary.
CREDIT = "clip: Intel IoT DevKit sample videos (bottle-detection.mp4, frames 400-549), CC-BY 4.0 (keepbits/assets/LICENSE-CC-BY-4.0)"
#: Payload settings of the demo (x̃ as one WebP image, for a NICE bundle) and the qualities the whole-frame files are swept over.
DEMO_CODEC = {"mode": "mixed", "codec": "webp", "quality": 75, "background": "webp"}
BASELINE_QUALITIES = (10, 25, 40, 55, 70, 85, 95)
#: First field of the demo's summary.json: a folder whose summary.json has it is the demo's own, which a rerun replaces.
MARKER = {"written_by": "keepbits demo"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from keepbits.cli.run import add_codec_arguments

    parser.add_argument("--out", type=Path, default=Path("keepbits-demo"),
                        help="output folder: a new or empty one, or an earlier demo's (its output is replaced)")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after N frames (default: the whole clip)")
    parser.add_argument("--model", type=Path, default=None, help="model bundle (default: the bundled EfficientNet-Lite0 + NICE model)")
    parser.add_argument("--source", default=None, help="stream (default: the bundled clip)")
    parser.add_argument("--no-compare", action="store_true", help="skip the JPEG/WebP comparison at matched agreement")
    add_codec_arguments(parser, {**DEMO_CODEC, "mode": f"{DEMO_CODEC['mode']} for a NICE bundle, simplified for a SimpleBits one"})
    parser.set_defaults(codec=None, quality=None, background=None)


def _matched(pipeline: Any, frames: list, codec: dict[str, Any]) -> dict[str, Any]:
    """The payload at the demo's settings vs whole-frame JPEG and WebP of the same model-size
    frames: agreement with the full-frame prediction of each (decoded, classified again) and the
    smallest file of each format that agrees at least as often as the payload."""
    from keepbits.runtime.evaluate import matched_baselines, rate_accuracy

    result = rate_accuracy(pipeline, frames, None, codecs=[codec["codec"]], qualities=[codec["quality"]], backgrounds=[codec["background"]],
                           modes=[codec["mode"]], webp_method=codec.get("webp_method"), baselines=("jpeg", "webp"),
                           baseline_qualities=BASELINE_QUALITIES)
    payload = result["payload"][0]
    matched = matched_baselines(result, payload)
    return {"frames": len(frames), "payload": payload, "matched": matched, "baselines": result["baselines"],
            "ratios": {fmt: (row["bytes_per_image"] / payload["bytes_per_image"] if row else None) for fmt, row in matched.items()}}


def _report(summary: dict, out: Path, comparison: dict | None) -> str:
    n = max(1, summary["written"])
    per = {k: summary.get(f"{k}_bytes", 0) / n for k in ("payload", "jpeg", "png", "lossless")}
    p = summary["pipeline"]
    codec = p["codec"]
    coded = (f"x̃ {codec['codec']} q{codec['quality']}" if codec["mode"] == "mixed" else
             f"kept blocks {codec['codec']} q{codec['quality']}, block means {codec['background']}")
    lines = [
        f"keepbits demo: {summary['written']} frames in {summary['seconds']:.1f} s ({summary['fps']:.1f} fps, "
        f"{', '.join(p['providers'])}), model input {p['input'][2]}x{p['input'][1]} ({p['resize_policy']}), block {p['block']}",
        f"  payload ({codec['mode']}, {coded}): "
        f"{per['payload']:7.0f} B/frame, "
        f"pixels kept at full resolution: {100 * (summary['kept_fraction_mean'] or 0):.1f}%",
        f"  lossless payload (blocks, PNG):      {per['lossless']:7.0f} B/frame; PNG of the model-size frame {per['png']:7.0f} B/frame",
    ]
    if comparison:
        payload = comparison["payload"]
        lines.append(f"  decoded payloads agree with the full-frame prediction on {100 * payload['agreement']:.1f}% of "
                     f"{comparison['frames']} frames ({payload['bytes_per_image']:.0f} B/frame)")
        for fmt, row in comparison["matched"].items():
            if row is None:
                lines.append(f"  {fmt.upper()}: no quality of {list(BASELINE_QUALITIES)} agrees as often")
            else:
                lines.append(f"  {fmt.upper()} at matched agreement (q{row['quality']}, {100 * row['agreement']:.1f}%): "
                             f"{row['bytes_per_image']:7.0f} B/frame ({comparison['ratios'][fmt]:.2f}x the payload)")
    written = [str(out / "annotated.mp4")] if (out / "annotated.mp4").is_file() else []
    written += [f"{out / 'payloads'}/"] if any((out / "payloads").glob("*.kbit")) else []
    written += [str(out / "frames.jsonl")] if summary["written"] else []
    lines += [f"  labels: {summary['labels']}", f"  wrote {', '.join([*written, str(out / 'summary.json')])}"]
    if summary.get("credit"):
        lines.append(f"  {summary['credit']}")
    return "\n".join(lines)


def _check_out(out: Path, source: str) -> bool:
    """Whether ``out`` holds an earlier demo's output, which a rerun replaces (its summary.json
    has :data:`MARKER`; an empty or new folder: False); :class:`InputError` for a file, a folder
    of other things (the demo replaces only what it made) or a ``source`` among the demo's files."""
    from keepbits.cli._common import output_folder

    if not output_folder(out).is_dir() or not any(out.iterdir()):
        return False
    try:
        ours = json.loads((out / "summary.json").read_text(encoding="utf-8")).get("written_by") == MARKER["written_by"]
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise InputError(f"--out {out}: holds files the demo did not write (no summary.json of keepbits demo); "
                         "choose a new or empty folder")
    if Path(source).is_file() and out.resolve() in Path(source).resolve().parents:
        raise InputError(f"--source {source} is inside --out {out}, whose earlier demo output a rerun replaces")
    return True


def run(args: argparse.Namespace) -> int:
    from keepbits.cli.run import EXIT_CODES, ProgressLine, codec_options
    from keepbits.runtime import Pipeline, open_source
    from keepbits.runtime.sinks import FilesSink, VideoSink
    from keepbits.runtime.stream import handle_signals, run_stream

    model = args.model or DEMO_BUNDLE
    source = args.source or str(DEMO_STREAM)
    if not Path(model).exists():
        raise InputError(f"demo bundle not found: {model} (docs/real_models.md shows how to build it)")
    if args.max_frames is not None and args.max_frames < 1:
        raise InputError(f"--max-frames must be >= 1, got {args.max_frames}")
    rerun = _check_out(args.out, source)
    args.codec = args.codec or DEMO_CODEC["codec"]
    args.quality = DEMO_CODEC["quality"] if args.quality is None else args.quality
    args.background = args.background or DEMO_CODEC["background"]
    pipeline = Pipeline.from_bundle(model, backend=args.backend, threads=args.threads, **codec_options(args))
    if args.mode is None and pipeline.explain == "mask":
        pipeline.codec_options["mode"] = DEMO_CODEC["mode"]
    stream = open_source(source)
    if rerun:  # the earlier demo's video goes (its payloads: FilesSink; its summary: replaced now), so none outlives this run
        (args.out / "annotated.mp4").unlink(missing_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({**MARKER, "status": "running"}) + "\n")  # an interrupted demo's folder stays its own
    sinks = [FilesSink(args.out, replace=True), VideoSink(args.out / "annotated.mp4", stream.fps)]
    with handle_signals(threading.Event()) as stop:
        summary = run_stream(pipeline, stream, sinks, max_frames=args.max_frames, compare=("jpeg", "png", "lossless"),
                             stop=stop, progress=ProgressLine(args.quiet))
    comparison = None
    if not args.no_compare and pipeline.explain == "mask" and summary["written"]:
        log.info("comparing with whole-frame JPEG and WebP files at matched agreement (%d frames, %d qualities each; "
                 "--no-compare skips it)", summary["written"], len(BASELINE_QUALITIES))
        with open_source(source) as again:  # the same frames once more, for the files of the comparison
            frames = [frame.image for frame, _ in zip(again, range(summary["written"]))]
        comparison = _matched(pipeline, frames, pipeline.codec_options)
        summary["matched_agreement"] = comparison
    if args.source is None:
        summary["credit"] = CREDIT
    (args.out / "summary.json").write_text(json.dumps({**MARKER, **summary}, indent=2) + "\n")
    print(_report(summary, args.out, comparison), file=sys.stdout)
    if summary["reason"]:
        print(f"keepbits: {summary['status']}: {summary['reason']}", file=sys.stderr)
    return EXIT_CODES[summary["status"]][0]
