"""Runtime throughput on real camera footage: predict+explain+compress vs classifier only
vs a naive loop, per-stage latency, and memory over a long looped run.

    OMP_WAIT_POLICY=PASSIVE python bench/runtime_throughput.py --data ../shared/data --generator nice_fast \
        --frames 60 --naive-frames 10 --rounds 7 --soak-seconds 600

Model: a ResNet-18 (ImageNet stem) at 224×224 with a NICE generator, b = 8: ``--generator``,
default ``nice_unet`` (the default of ``keepbits train nice``); ``nice_fast`` is the cheap
deployment generator. Exported to a deployment bundle with ``keepbits.export``
(``mixed_output=False``: outputs logits and ẑ, what the runtime reads; untrained weights:
the model's compute is the same). The generator's initial bias keeps every pixel, so by
default the codec runs its worst case, every block kept. ``--kept-fraction F`` measures an
operating point of a sparse mask instead: the generator's 1×1 head gets seeded random
weights and a bias set so that ẑ > 0.5 (⇔ log α > 0, Eq. 11) on a fraction F of the pixels
of the calibration frames; the mask then follows the frame's content through the untrained
features (a stand-in for a trained mask's sparsity, not its semantics). Frames:
``videos/bottle-detection.mp4`` (640×360), letterboxed to 224×224.

Two settings, each measured for the classifier alone and for the pipeline:

* latency setting: one model thread, ONNX Runtime's intra-op threads on every core
  (``--threads``, default ORT's choice); classifier-only with ORT spinning on and off (the
  faster counts; the pipeline runs with spinning off, its default);
* throughput setting: ``--workers`` model threads (default: one per CPU), each with a
  one-thread session, frames in parallel (``run_stream(..., workers=N)``; classifier-only:
  N threads taking frames from one shared queue, each letterboxing and calling ``session.run``); each side
  measured with OpenCV's thread pool at its default and at 1 thread (``run_stream``'s
  ``opencv_threads=1``), the faster counts.

* classifier only: the same letterbox + an ONNX Runtime session of the bundle's own graph cut
  down to image → logits (normalise + ResNet-18);
* graph only (latency setting): the same letterbox + the bundle's session (generator +
  classifier), no codec;
* pipeline: :func:`keepbits.runtime.stream.run_stream` (preprocess, generator+classifier
  graph, lossless payload encode in the writer thread), no sinks;
* naive: torch eager generator+classifier, mask + mixed image in torch, PIL PNG of x̃.

Where the throughput setting's pipeline spends its time beyond the classifier (same rounds):
``pipeline_workers_no_encode`` is the pipeline with ``compress=False`` (no payload), and
``pipeline_workers_no_generator`` the pipeline on the classifier-only session with each frame's
own mask, recorded from the bundle beforehand (no generator, the same encode work per frame).

``--model NICE_CHECKPOINT`` measures a whole trained model instead (its own classifier, generator,
normalisation, block size and preprocessing; e.g. EfficientNet-Lite0 with a trained ``nice_fast``):
the bundle is exported from the checkpoint, frames reach the model size by its resize policy, and
the naive loop applies the same policy with PIL (center-crop: resize so the short side is
size / crop fraction, crop the centre; letterbox: thumbnail and paste; resize: stretch).

The headline ratio is the best pipeline setting over the best classifier-only setting;
the ratio within each setting is recorded too. ``--generator-checkpoint`` swaps in a trained
generator (a real mask operating point instead of the untrained keep-everything head).
They alternate in rounds (order rotated each round) on the same frames, in the same
process; throughput is the median over rounds, and each round's ratios come from that round.
Process CPU time per frame (all threads) is recorded too: on a shared machine it is steadier
than wall time. Thread settings are recorded in the JSON. ``--pairs N`` adds N back-to-back ABBA blocks of the throughput
setting (classifier only, graph only, pipeline without encode, pipeline, the naive loop where there is
one, then in reverse), whose median ratios and their distribution-free intervals hold when the host's speed drifts between rounds. The soak loops the video through ``run_stream`` and samples RSS.
Writes ``bench/results/runtime_throughput[_GENERATOR][_int8][_keptF][_trained][_TAG].json``
(``--model``: ``runtime_throughput_<checkpoint folder>[_int8][_TAG].json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Callable

import cv2
import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import add_data_argument, median_interval, video_frames, write_result  # noqa: E402

from keepbits import registry  # noqa: E402
from keepbits.export import export_onnx  # noqa: E402
from keepbits.runtime import Pipeline, open_source  # noqa: E402
from keepbits.native import session_options  # noqa: E402
from keepbits.runtime.stream import run_stream  # noqa: E402
from keepbits.training import functional  # noqa: E402
from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, save_checkpoint  # noqa: E402

SIZE, BLOCK = 224, 8
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def norm_tensors(normalization: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    norm = normalization or {"mean": MEAN, "std": STD}
    return torch.tensor(norm["mean"]).view(1, 3, 1, 1), torch.tensor(norm["std"]).view(1, 3, 1, 1)


def build_models(generator_name: str, seed: int = 0, generator_checkpoint: Path | None = None
                 ) -> tuple[torch.nn.Module, torch.nn.Module, Normalization | None]:
    """Untrained ResNet-18 and generator, or the trained generator of a NICE checkpoint (its
    architecture must be ``generator_name``); returns the checkpoint's normalisation too."""
    torch.manual_seed(seed)
    classifier = registry.build("resnet18", in_channels=3, num_classes=1000).eval()
    if generator_checkpoint is None:
        return registry.build(generator_name, in_channels=3).eval(), classifier, None
    from keepbits.training.nice import load_nice

    generator, _, ckpt = load_nice(generator_checkpoint)
    arch = ckpt.models["generator"].arch
    if arch != generator_name:
        raise SystemExit(f"{generator_checkpoint}: generator is {arch}, not --generator {generator_name}")
    return generator, classifier, ckpt.normalization


def sparsify_head(generator: torch.nn.Module, images: np.ndarray, fraction: float, seed: int = 0) -> dict:
    """Give the generator's last 1-channel convolution seeded random weights and the bias that
    makes log α > 0 (ẑ > 0.5) on ``fraction`` of the pixels of ``images`` (uint8 N×H×W×3)."""
    head = [m for m in generator.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 1][-1]
    gen = torch.Generator().manual_seed(seed)
    mean_t, std_t = norm_tensors(None)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean_t) / std_t
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) / head.weight[0].numel() ** 0.5)
        head.bias.zero_()
        log_alpha = generator(x)
        head.bias.fill_(-float(torch.quantile(log_alpha.flatten()[:: max(1, log_alpha.numel() // 2**24)], 1 - fraction)))
        kept = float((functional.deterministic_mask(generator(x)) > 0.5).float().mean())
    return {"requested": fraction, "kept_on_calibration_frames": kept, "head_seed": seed}


def make_bundle(generator, classifier, folder: Path, generator_name: str, normalization: Normalization | None = None) -> Path:
    ckpt = save_checkpoint(folder / "nice.pt", Checkpoint(
        kind="nice",
        models={"generator": ModelEntry.of(generator_name, {"in_channels": 3}, generator),
                "classifier": ModelEntry.of("resnet18", {"in_channels": 3, "num_classes": 1000}, classifier)},
        input_shape=[3, SIZE, SIZE], normalization=normalization or Normalization(MEAN, STD),
        class_names=[f"class{i}" for i in range(1000)], settings={"block_size": BLOCK, "mask_threshold": 0.5},
        command="bench/runtime_throughput.py (untrained weights)",
    ))
    return export_onnx(ckpt, folder / "bundle", mixed_output=False, verify=False).source


def classifier_only_graph(bundle: Path, out: Path) -> Path:
    """The bundle's own graph cut down to image → logits (``onnx.utils.extract_model``): the
    classifier path exactly as the bundle runs it (in-graph normalisation, the same weights and,
    for an INT8 bundle, the same quantisation), without the generator and the compose."""
    from onnx.utils import extract_model

    from keepbits.bundle import load_bundle

    loaded = load_bundle(bundle)
    if loaded.manifest.classify_on != "original":
        raise SystemExit(f"{bundle}: classifies the {loaded.manifest.classify_on} image; the classifier-only cut needs 'original'")
    extract_model(str(loaded.model_path), str(out), [loaded.manifest.input_name], ["logits"])
    return out


def quantize(bundle: Path, calibration: np.ndarray, work: Path) -> tuple[Path, dict]:
    """INT8 copy of the bundle (ORT static, QDQ, per channel; ``keepbits.export.quantize``),
    calibrated on letterboxed frames; returns its path and the fp32-vs-int8 comparison on them."""
    from keepbits.export.quantize import quantize_bundle

    npz = work / "calibration.npz"
    zeros = np.zeros(len(calibration), np.int64)
    np.savez(npz, x_train=calibration, y_train=zeros, x_test=calibration, y_test=zeros)
    bundle_int8, report = quantize_bundle(bundle, work / "bundle_int8", npz, calibration_images=len(calibration),
                                          eval_images=len(calibration))
    return bundle_int8.source, report


def classifier_sessions(path: Path, threads: int | None) -> dict[str, ort.InferenceSession]:
    """The classifier-only graph with the pipeline's thread count, ORT spinning off and on."""
    return {name: ort.InferenceSession(str(path), session_options(threads, native=False, spinning=spin), providers=["CPUExecutionProvider"])
            for name, spin in (("no_spin", False), ("spin", True))}


def run_session(session, outputs: list[str], pipe: Pipeline, frames) -> float:
    """Frames/s of letterbox (the pipeline's own) + one ``session.run`` per frame (``frames``: any iterable)."""
    buf = np.empty((1, SIZE, SIZE, 3), np.uint8)
    start, done = time.perf_counter(), 0
    for f in frames:
        pipe._fit(f, buf[0])
        session.run(outputs, {"image": buf})
        done += 1
    return done / (time.perf_counter() - start)


def drain(todo: SimpleQueue):
    """The items of ``todo`` until it is empty (several threads may drain one queue)."""
    while True:
        try:
            yield todo.get_nowait()
        except Empty:
            return


def run_session_workers(session, outputs: list[str], pipe: Pipeline, frames, workers: int) -> float:
    """Frames/s of ``workers`` threads, each taking the next frame from one shared queue (as
    ``run_stream``'s workers do: a thread the host slows takes fewer frames), letterboxing it
    into its own buffer and calling ``session.run`` (one-thread session: the runs go in parallel)."""
    todo: SimpleQueue = SimpleQueue()
    for f in frames:
        todo.put(f)
    threads = [threading.Thread(target=run_session, args=(session, outputs, pipe, drain(todo))) for _ in range(workers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(frames) / (time.perf_counter() - start)


class ClassifierWithRecordedMasks:
    """A stand-in session for the decomposition: the classifier-only session's logits and, per
    frame, the mask the bundle's graph gave that frame (recorded beforehand, looked up by a CRC
    of the model input): the pipeline's work without the generator, the same encode work."""

    def __init__(self, session: ort.InferenceSession, masks: dict[int, np.ndarray]):
        self.session, self.masks = session, masks

    @staticmethod
    def key(model_input: np.ndarray) -> int:
        return zlib.crc32(np.ascontiguousarray(model_input).data)

    def run(self, outputs: list[str], feed: dict) -> list[np.ndarray]:
        batch = next(iter(feed.values()))
        logits = self.session.run(["logits"], feed)[0]
        return [logits, np.stack([self.masks[self.key(x)] for x in batch])]

    def get_providers(self) -> list[str]:
        return self.session.get_providers()


def run_pipeline(pipe: Pipeline, frames, workers: int = 1, opencv_threads: int | None = None) -> tuple[float, dict]:
    summary = run_stream(pipe, open_source(frames), [], compare=(), workers=workers, opencv_threads=opencv_threads)
    return summary["written"] / summary["seconds"], summary


def paired_blocks(blocks: int, frames, sessions: dict, pipe: Pipeline, pipe_workers: Pipeline, pipe_no_encode: Pipeline,
                 workers: int, naive: Callable[[], float] | None = None) -> dict:
    """The throughput setting's ratios from back-to-back runs, robust to a host whose speed drifts
    between rounds. Each of ``blocks`` blocks runs, on the same ``frames``, with ``workers``
    threads and OpenCV at one thread: classifier only, graph only (the bundle's session: the
    generator added), pipeline without the encode, pipeline; then the same in reverse order
    (ABBA: a linear drift cancels). A block's ratio of a measure is its mean frames/s over the
    classifier's; per measure the median over blocks with its distribution-free 95 % interval
    (the headline ``ratio_median``: the pipeline's). Consecutive ratios split the pipeline's cost:
    generator (graph / classifier), stream work (no-encode pipeline / graph), encode (pipeline /
    no-encode pipeline). The classifier's drift within a block (|log(second / first)|, median)
    says how steady the host was. ``naive`` (frames/s of the naive torch loop, on its own fewer
    frames) joins each block last and first; ``pipeline_over_naive`` is then the median of the
    blocks' pipeline / naive ratios with its interval."""
    runs = {
        "classifier_only": lambda: run_session_workers(sessions["workers"], ["logits"], pipe, frames, workers),
        "graph_only": lambda: run_session_workers(pipe_workers.session, ["logits", "mask"], pipe, frames, workers),
        "pipeline_no_encode": lambda: run_pipeline(pipe_no_encode, frames, workers)[0],
        "pipeline": lambda: run_pipeline(pipe_workers, frames, workers)[0],
    }
    measures = list(runs)[1:]  # each over the classifier alone
    if naive is not None:
        runs["naive"] = naive
    order = list(runs)
    rows = []
    for _ in range(blocks):
        fps: dict[str, list[float]] = {name: [] for name in order}
        for name in order + order[::-1]:
            fps[name].append(with_opencv_threads(1, runs[name]))
        rows.append({f"{name}_fps": v for name, v in fps.items()}
                    | {f"{name}_ratio": sum(fps[name]) / sum(fps["classifier_only"]) for name in measures}
                    | ({"pipeline_over_naive": sum(fps["pipeline"]) / sum(fps["naive"])} if naive is not None else {}))

    def summary(name: str, key: str | None = None) -> dict:
        ratios = [r[key or f"{name}_ratio"] for r in rows]
        return {"median": statistics.median(ratios), "ci95": median_interval(ratios)}

    steps = {"generator": ("graph_only", None), "stream_work": ("pipeline_no_encode", "graph_only"), "encode": ("pipeline", "pipeline_no_encode")}
    return {"blocks": rows, "frames_per_run": len(frames), "workers": workers, "opencv_threads": 1,
            "ratio_median": summary("pipeline")["median"], "ratio_median_ci95": summary("pipeline")["ci95"],
            "ratios": {name: summary(name) for name in measures},
            **({"pipeline_over_naive": summary("naive", "pipeline_over_naive")} if naive is not None else {}),
            "steps_median": {step: statistics.median(r[f"{a}_ratio"] / (r[f"{b}_ratio"] if b else 1.0) for r in rows)
                             for step, (a, b) in steps.items()},
            "classifier_only_drift_median": statistics.median(abs(math.log(r["classifier_only_fps"][1] / r["classifier_only_fps"][0]))
                                                              for r in rows)}


def with_opencv_threads(threads: int, run, *args):
    """``run(*args)`` with OpenCV's thread pool at ``threads`` (restored afterwards)."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(threads)
    try:
        return run(*args)
    finally:
        cv2.setNumThreads(before)


def pil_fit(frame: np.ndarray, policy: str = "letterbox", crop_fraction: float = 1.0) -> Image.Image:
    """The frame at SIZE×SIZE by ``policy``, the way a plain PIL loop would do it."""
    img = Image.fromarray(frame)
    if policy == "resize":
        return img.resize((SIZE, SIZE), Image.BILINEAR)
    if policy == "center-crop":
        scale = SIZE / crop_fraction / min(img.size)
        img = img.resize((max(SIZE, round(img.width * scale)), max(SIZE, round(img.height * scale))), Image.BILINEAR)
        left, top = (img.width - SIZE) // 2, (img.height - SIZE) // 2
        return img.crop((left, top, left + SIZE, top + SIZE))
    img.thumbnail((SIZE, SIZE))
    canvas = Image.new("RGB", (SIZE, SIZE))
    canvas.paste(img, ((SIZE - img.width) // 2, (SIZE - img.height) // 2))
    return canvas


def run_naive(generator, classifier, frames, mean_t: torch.Tensor, std_t: torch.Tensor, policy: str = "letterbox",
              crop_fraction: float = 1.0) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for f in frames:
            x = torch.from_numpy(np.array(pil_fit(f, policy, crop_fraction))).permute(2, 0, 1)[None].float() / 255
            xn = (x - mean_t) / std_t
            if hasattr(generator, "from_features"):  # nice_taps: one classifier pass gives the logits and the features
                logits, features = classifier.forward_taps(xn, generator.taps)
                log_alpha = generator.from_features(features, xn.shape[-2:])
            else:
                log_alpha, logits = generator(xn), classifier(xn)
            mask = functional.deterministic_mask(log_alpha)
            mixed = functional.mixed_resolution(x, mask, BLOCK)
            logits.argmax(1)
            out = (mixed[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(out).save(io.BytesIO(), format="PNG")
    return len(frames) / (time.perf_counter() - start)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(pipe: Pipeline, video: Path, seconds: float, workers: int = 1) -> dict:
    stop, samples = threading.Event(), []
    start = time.monotonic()

    def sample():
        while not stop.wait(5.0):
            samples.append((round(time.monotonic() - start, 1), round(rss_mb(), 1)))

    threading.Timer(seconds, stop.set).start()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    summary = run_stream(pipe, open_source(video, loop=True), [], compare=("jpeg",), stop=stop, workers=workers)
    stop.set()
    rss = [r for _, r in samples]
    k = max(1, len(rss) // 5)
    return {
        "seconds": summary["seconds"], "frames": summary["written"], "fps": summary["fps"],
        "rss_mb_first_fifth_mean": round(statistics.mean(rss[:k]), 1) if rss else None,
        "rss_mb_last_fifth_mean": round(statistics.mean(rss[-k:]), 1) if rss else None,
        "rss_mb_max": max(rss) if rss else None, "rss_samples": samples,
        "payload_bytes_per_frame": summary["payload_bytes_per_frame"], "ratio_vs_jpeg": summary.get("ratio_vs_jpeg"),
        "latency_ms": summary["latency_ms"], "source": summary["source"], "workers": workers,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_argument(p, "videos/")
    p.add_argument("--frames", type=int, default=60, help="frames per measurement round")
    p.add_argument("--naive-frames", type=int, default=10, help="frames per round for the (slow) naive loop")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op / torch threads (default: library choice)")
    p.add_argument("--soak-seconds", type=float, default=600.0, help="0 skips the soak")
    p.add_argument("--generator", default="nice_unet", help="registered generator (nice_unet, nice_fast, nice_caltech)")
    p.add_argument("--int8", action="store_true", help="quantise the bundle to INT8 (ORT static quantisation, calibrated on --calibration-frames "
                   "later frames of the video); classifier-only is cut from it, the naive loop stays torch float32")
    p.add_argument("--calibration-frames", type=int, default=64)
    p.add_argument("--kept-fraction", type=float, default=None,
                   help="sparse-mask operating point (see above); default: untrained head, every pixel kept")
    p.add_argument("--generator-checkpoint", type=Path, default=None,
                   help="a NICE checkpoint whose trained generator (architecture --generator) replaces the untrained one; "
                        "the bundle takes its normalisation (the classifier stays the untrained ResNet-18)")
    p.add_argument("--model", type=Path, default=None,
                   help="a trained NICE checkpoint measured as a whole (its classifier, generator, b and preprocessing) instead "
                        "of the untrained ResNet-18 with --generator")
    p.add_argument("--bundle", type=Path, default=None,
                   help="a trained deployment bundle (folder or .zip) measured as it is, e.g. the shipped demo "
                        "src/keepbits/assets/lite0_nice_bundle.zip; no naive loop (a bundle holds no torch models)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="model threads of the throughput setting (one-thread sessions); default: one per CPU")
    p.add_argument("--pairs", type=int, default=0,
                   help="after the rounds, this many ABBA blocks of the throughput setting (classifier only, graph only, pipeline "
                        "without encode, pipeline, then in reverse) on --pair-frames frames each; 0 skips them (at least 6)")
    p.add_argument("--pair-frames", type=int, default=120, help="frames per run of a block")
    p.add_argument("--tag", default="", help="suffix of the result file")
    args = p.parse_args()
    if args.pairs and args.pairs < 6:
        p.error("--pairs needs at least 6 blocks for an interval of the median (or 0)")
    if args.kept_fraction is not None and not 0 < args.kept_fraction < 1:
        p.error("--kept-fraction must be in (0, 1)")
    if args.kept_fraction is not None and args.generator_checkpoint is not None:
        p.error("--kept-fraction sets an untrained head; it does not combine with --generator-checkpoint")
    if args.model is not None and (args.kept_fraction is not None or args.generator_checkpoint is not None):
        p.error("--model measures a whole trained model; it does not combine with --kept-fraction or --generator-checkpoint")
    if args.bundle is not None and (args.model is not None or args.kept_fraction is not None or args.generator_checkpoint is not None):
        p.error("--bundle measures a bundle as it is; it does not combine with --model, --kept-fraction or --generator-checkpoint")
    if args.data is None:
        p.error("--data is required (no ../shared/data here)")
    video = args.data / "videos" / "bottle-detection.mp4"
    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    global SIZE, BLOCK
    policy, crop_fraction, described = "letterbox", 1.0, None
    if args.model is not None:
        from keepbits.training.nice import load_nice

        generator, classifier, ckpt = load_nice(args.model)
        normalization, pre = ckpt.normalization, ckpt.preprocessing_record()
        SIZE, BLOCK = pre.input_size[0], int(ckpt.settings["block_size"])
        policy, crop_fraction = pre.resize_policy, pre.crop_fraction
        described = {"classifier": f"{ckpt.models['classifier'].arch} (trained)", "generator": f"{ckpt.models['generator'].arch}, trained: {args.model}"}
        bundle = export_onnx(args.model, work / "bundle", mixed_output=False, verify=False).source
    elif args.bundle is not None:
        from keepbits.bundle import load_bundle

        manifest = load_bundle(args.bundle).manifest
        generator = classifier = None  # no naive loop: the bundle holds no torch models
        normalization = Normalization(list(manifest.mean), list(manifest.std))
        SIZE, BLOCK = int(manifest.input_shape[1]), int(manifest.block_size)
        policy, crop_fraction = manifest.resize_policy, manifest.crop_fraction
        described = {"classifier": f"{manifest.classifier} (from the bundle)", "generator": f"{manifest.generator} (from the bundle)",
                     "bundle": str(args.bundle)}
        bundle = args.bundle
    else:
        generator, classifier, normalization = build_models(args.generator, generator_checkpoint=args.generator_checkpoint)
        bundle = make_bundle(generator, classifier, work, args.generator, normalization)
    mean_t, std_t = norm_tensors(dataclasses.asdict(normalization) if normalization else None)
    pipe = Pipeline.from_bundle(bundle, backend="onnxruntime", threads=args.threads)
    needs_calibration = args.int8 or args.kept_fraction is not None
    frames = video_frames(video, args.frames + (args.calibration_frames if needs_calibration else 0))
    frames, calibration_frames = frames[: args.frames], frames[args.frames :]
    calibration = np.empty((len(calibration_frames), SIZE, SIZE, 3), np.uint8)
    for f, slot in zip(calibration_frames, calibration):
        pipe._fit(f, slot)
    quantization = sparsity = None
    if args.kept_fraction is not None:
        sparsity = sparsify_head(generator, calibration, args.kept_fraction)
        bundle = make_bundle(generator, classifier, work / "sparse", args.generator)
        pipe = Pipeline.from_bundle(bundle, backend="onnxruntime", threads=args.threads)
    if args.int8:
        bundle, quantization = quantize(bundle, calibration, work)
        pipe = Pipeline.from_bundle(bundle, backend="onnxruntime", threads=args.threads)
    classifier_graph = classifier_only_graph(bundle, work / "classifier_only.onnx")
    sessions = classifier_sessions(classifier_graph, args.threads)
    sessions["workers"] = ort.InferenceSession(str(classifier_graph), session_options(1, native=False), providers=["CPUExecutionProvider"])
    pipe_workers = Pipeline.from_bundle(bundle, backend="onnxruntime", threads=1)
    pipe_no_encode = Pipeline.from_bundle(bundle, backend="onnxruntime", threads=1, compress=False)
    recorded, one = {}, np.empty((1, SIZE, SIZE, 3), np.uint8)
    for f in [None, *frames]:  # None: the zero frame Pipeline checks the model with when it loads
        if f is None:
            one[0] = 0
        else:
            pipe._fit(f, one[0])
        feed = pipe._feed(one)
        recorded[ClassifierWithRecordedMasks.key(feed[0])] = pipe_workers.session.run(["mask"], {pipe.manifest.input_name: feed})[0][0]
    from keepbits.bundle import load_bundle

    pipe_no_generator = Pipeline(load_bundle(bundle), session=ClassifierWithRecordedMasks(sessions["workers"], recorded))
    run_pipeline(pipe, frames[:4]), run_pipeline(pipe_workers, frames[:4], args.workers)  # warm-up
    naive = generator is not None
    if naive:
        run_naive(generator, classifier, frames[:2], mean_t, std_t, policy, crop_fraction)
    for session in sessions.values():
        run_session(session, ["logits"], pipe, frames[:4])
    naive_frames = frames[:args.naive_frames]
    measures = {  # name: (run, frames it processes)
        "classifier_only_no_spin": (lambda: run_session(sessions["no_spin"], ["logits"], pipe, frames), len(frames)),
        "pipeline": (lambda: run_pipeline(pipe, frames), len(frames)),
        "classifier_only_workers": (lambda: run_session_workers(sessions["workers"], ["logits"], pipe, frames, args.workers), len(frames)),
        "classifier_only_workers_opencv1": (lambda: with_opencv_threads(1, run_session_workers, sessions["workers"], ["logits"], pipe,
                                                                        frames, args.workers), len(frames)),
        "classifier_only_spin": (lambda: run_session(sessions["spin"], ["logits"], pipe, frames), len(frames)),
        "pipeline_workers": (lambda: run_pipeline(pipe_workers, frames, args.workers), len(frames)),
        "pipeline_workers_opencv1": (lambda: run_pipeline(pipe_workers, frames, args.workers, opencv_threads=1), len(frames)),
        "graph_only": (lambda: run_session(pipe.session, ["logits", "mask"], pipe, frames), len(frames)),
        "pipeline_workers_no_encode": (lambda: run_pipeline(pipe_no_encode, frames, args.workers), len(frames)),
        "pipeline_workers_no_generator": (lambda: run_pipeline(pipe_no_generator, frames, args.workers), len(frames)),
    }
    if naive:
        measures["naive"] = (lambda: run_naive(generator, classifier, naive_frames, mean_t, std_t, policy, crop_fraction), len(naive_frames))
    rounds = []
    for r in range(args.rounds):
        names = list(measures)
        names = names[r % len(names):] + names[:r % len(names)]  # rotate the order: no measure always runs first
        row: dict = {"order": names}
        for name in names:
            run, n = measures[name]
            cpu = time.process_time()
            value = run()
            row[f"{name}_cpu_ms_per_frame"] = (time.process_time() - cpu) * 1e3 / n  # all threads of the process
            if name.startswith("pipeline"):
                value, summary = value
                suffix = name[len("pipeline"):]
                row.update({f"latency_ms{suffix}": summary["latency_ms"], f"payload_bytes_per_frame{suffix}": summary["payload_bytes_per_frame"],
                            f"kept_fraction_mean{suffix}": summary["kept_fraction_mean"]})
            row[f"{name}_fps"] = value
        row["classifier_only_latency_setting_fps"] = max(row["classifier_only_no_spin_fps"], row["classifier_only_spin_fps"])
        row["classifier_only_throughput_setting_fps"] = max(row["classifier_only_workers_fps"], row["classifier_only_workers_opencv1_fps"])
        row["classifier_only_fps"] = max(row["classifier_only_latency_setting_fps"], row["classifier_only_throughput_setting_fps"])
        row["pipeline_throughput_setting_fps"] = max(row["pipeline_workers_fps"], row["pipeline_workers_opencv1_fps"])
        row["pipeline_best_fps"] = max(row["pipeline_fps"], row["pipeline_throughput_setting_fps"])
        row["pipeline_over_classifier_only"] = row["pipeline_best_fps"] / row["classifier_only_fps"]
        for part in ("no_encode", "no_generator"):
            row[f"throughput_setting_ratio_{part}"] = row[f"pipeline_workers_{part}_fps"] / row["classifier_only_throughput_setting_fps"]
        row["latency_setting_ratio"] = row["pipeline_fps"] / row["classifier_only_latency_setting_fps"]
        row["throughput_setting_ratio"] = row["pipeline_throughput_setting_fps"] / row["classifier_only_throughput_setting_fps"]
        if naive:
            row["pipeline_over_naive"] = row["pipeline_best_fps"] / row["naive_fps"]
        rounds.append(row)
        print(f"round {r + 1}: classifier-only {row['classifier_only_no_spin_fps']:.2f} / {row['classifier_only_spin_fps']:.2f} (spin) / "
              f"{row['classifier_only_workers_fps']:.2f} / {row['classifier_only_workers_opencv1_fps']:.2f} ({args.workers} workers, "
              f"OpenCV default / 1 thread) fps, graph-only {row['graph_only_fps']:.2f}, pipeline {row['pipeline_fps']:.2f} / "
              f"{row['pipeline_workers_fps']:.2f} / {row['pipeline_workers_opencv1_fps']:.2f} ({args.workers} workers, OpenCV "
              f"default / 1 thread)" + (f", naive {row['naive_fps']:.2f} fps; " if naive else "; ") +
              f"best/best {row['pipeline_over_classifier_only']:.3f} (latency setting {row['latency_setting_ratio']:.3f}, "
              f"throughput setting {row['throughput_setting_ratio']:.3f}); p50 ms " +
              ", ".join(f"{k} {v['p50']:.2f}" for k, v in row["latency_ms_workers"].items()), flush=True)
    keys = ("classifier_only_fps", "classifier_only_latency_setting_fps", "classifier_only_throughput_setting_fps",
            *(f"{name}_fps" for name in measures), "pipeline_throughput_setting_fps", "pipeline_best_fps",
            *(f"{name}_cpu_ms_per_frame" for name in measures))
    med = {k: statistics.median(x[k] for x in rounds) for k in keys}

    def stage_medians(key: str) -> dict:
        return {stage: {q: statistics.median(x[key][stage][q] for x in rounds) for q in ("p50", "p99")} for stage in rounds[0][key]}

    def ratio_summary(key: str) -> dict:
        values = [x[key] for x in rounds]
        return {"median_of_rounds": statistics.median(values), "range_of_rounds": [min(values), max(values)]}

    trained = args.generator_checkpoint is not None or args.model is not None or args.bundle is not None
    result = {
        "model": {**({"classifier": "resnet18 (ImageNet stem, 1000 classes, untrained)"} if described is None else described),
                  "resize_policy": f"{policy} (crop fraction {crop_fraction:g})",
                  **({} if described else {"generator": (f"{args.generator}, trained: {args.generator_checkpoint}" if trained else
                                f"{args.generator} (untrained" + (", head set to a sparse operating point)" if sparsity else ")"))}),
                  "mask_operating_point": (sparsity or ("the trained generator's own masks on these frames" if trained else
                                                        "untrained head: every pixel kept (the codec's worst case)")),
                  "normalization": dataclasses.asdict(normalization) if normalization else {"mean": MEAN, "std": STD},
                  "precision": "int8 (bundle, hence classifier-only; naive float32)" if args.int8 else "float32",
                  "bundle_outputs": pipe.manifest.output_names,
                  "classifier_only": "the bundle's graph cut to image -> logits (onnx.utils.extract_model)",
                  "int8_vs_float32_on_calibration_frames": quantization,
                  "input": [3, SIZE, SIZE], "block": BLOCK, "providers": pipe.providers, "custom_ops": pipe.manifest.custom_ops},
        "codec": pipe.describe()["codec"],
        "threads": {
            "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "latency_setting": {"ort_intra_op_threads": args.threads or "ORT default (one per physical core)", "workers": 1,
                                "classifier_only": "spinning off and on measured, the faster counts", "pipeline_ort_spinning": pipe.spinning},
            "throughput_setting": {"ort_intra_op_threads": 1, "workers": args.workers,
                                   "classifier_only": f"{args.workers} threads taking frames from one shared queue, each letterbox + session.run",
                                   "pipeline": f"run_stream(..., workers={args.workers}) with a one-thread session"},
            "extra_pipeline_threads": "source grabber + writer (encode with 1 worker, sinks; with several, each worker encodes its frames)",
            "opencv_threads": {"default": cv2.getNumThreads(), "classifier_only": "default and 1 measured (throughput setting), the "
                               "faster counts", "pipeline": "run_stream's default (OpenCV's setting left alone) and "
                               "opencv_threads=1 measured (throughput setting), the faster counts"},
            "torch_threads_naive": torch.get_num_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        },
        "video": str(video.name), "frames_per_round": len(frames), "naive_frames_per_round": min(len(frames), args.naive_frames),
        "rounds": rounds, "median": med, "cpu_load_avg_at_start": load_at_start,
        "latency_ms_median_over_rounds": stage_medians("latency_ms"),
        "latency_ms_median_over_rounds_workers": stage_medians("latency_ms_workers"),
        "pipeline_over_classifier_only": med["pipeline_best_fps"] / med["classifier_only_fps"],
        "pipeline_over_classifier_only_rounds": ratio_summary("pipeline_over_classifier_only"),
        "pipeline_over_classifier_only_fastest_rounds": (max(x["pipeline_best_fps"] for x in rounds)
                                                         / max(x["classifier_only_fps"] for x in rounds)),
        "latency_setting_ratio": med["pipeline_fps"] / med["classifier_only_latency_setting_fps"],
        "latency_setting_ratio_rounds": ratio_summary("latency_setting_ratio"),
        "throughput_setting_ratio": med["pipeline_throughput_setting_fps"] / med["classifier_only_throughput_setting_fps"],
        "throughput_setting_ratio_rounds": ratio_summary("throughput_setting_ratio"),
        **({"pipeline_over_naive": med["pipeline_best_fps"] / med["naive_fps"],
            "pipeline_over_naive_rounds": ratio_summary("pipeline_over_naive")} if naive else {}),
        "pipeline_over_graph_only": med["pipeline_fps"] / med["graph_only_fps"],
        "throughput_setting_decomposition": {
            f"ratio_{part}": med[f"pipeline_workers_{part}_fps"] / med["classifier_only_throughput_setting_fps"] for part in ("no_encode", "no_generator")}
        | {f"cpu_ms_per_frame_{name}": med[f"{name}_cpu_ms_per_frame"] for name in (
            "classifier_only_workers", "pipeline_workers", "pipeline_workers_no_encode", "pipeline_workers_no_generator")},
        "definitions": {"pipeline_over_classifier_only": "best pipeline setting / best classifier-only setting (medians over rounds)",
                        "pipeline_over_classifier_only_fastest_rounds": "the same from each side's fastest round: on a shared "
                        "machine other load only slows a round, so this is the steadier estimate when rounds scatter",
                        "latency_setting_ratio": "1 worker, ORT threads on every core, both", "throughput_setting_ratio":
                        f"{args.workers} workers with one-thread sessions, both, each at its faster OpenCV thread setting",
                        "throughput_setting_decomposition": "the throughput setting's pipeline (OpenCV default) without the payload "
                        "encode (compress=False) and without the generator (classifier-only session + each frame's recorded mask), over "
                        "the throughput setting's classifier only; and each one's process CPU ms per frame",
                        "paired": "--pairs ABBA blocks of the throughput setting (see paired_blocks): median ratio over blocks "
                        "and its distribution-free 95 % interval per measure, and the pipeline's cost split into steps"},
        "targets": {"pipeline_over_classifier_only": ">= 0.90", "pipeline_over_naive": ">= 3"},
    }
    print(f"pipeline/classifier-only (best/best) {result['pipeline_over_classifier_only']:.3f} (fastest rounds "
          f"{result['pipeline_over_classifier_only_fastest_rounds']:.3f}); latency setting "
          f"{result['latency_setting_ratio']:.3f}, throughput setting {result['throughput_setting_ratio']:.3f}"
          + (f"; pipeline/naive {result['pipeline_over_naive']:.2f}" if naive else ""), flush=True)
    if args.pairs:
        naive_run = (lambda: run_naive(generator, classifier, naive_frames, mean_t, std_t, policy, crop_fraction)) if naive else None
        result["paired"] = paired_blocks(args.pairs, frames[:args.pair_frames], sessions, pipe, pipe_workers, pipe_no_encode, args.workers,
                                         naive_run)
        print(f"paired blocks: pipeline / classifier only {result['paired']['ratio_median']:.3f} "
              f"(95 % interval {result['paired']['ratio_median_ci95'][0]:.3f}-{result['paired']['ratio_median_ci95'][1]:.3f}; "
              f"classifier-only drift within a block {result['paired']['classifier_only_drift_median']:.3f}; steps "
              + ", ".join(f"{k} {v:.3f}" for k, v in result["paired"]["steps_median"].items()) + ")"
              + (f"; pipeline / naive {result['paired']['pipeline_over_naive']['median']:.2f} (95 % interval "
                 f"{result['paired']['pipeline_over_naive']['ci95'][0]:.2f}-{result['paired']['pipeline_over_naive']['ci95'][1]:.2f})"
                 if naive else ""), flush=True)
    if args.soak_seconds > 0:
        workers_win = med["pipeline_workers_fps"] >= med["pipeline_fps"]
        result["soak"] = soak(pipe_workers if workers_win else pipe, video, args.soak_seconds, args.workers if workers_win else 1)
        print(f"soak: {result['soak']['frames']} frames in {result['soak']['seconds']:.0f} s, RSS {result['soak']['rss_mb_first_fifth_mean']} -> "
              f"{result['soak']['rss_mb_last_fifth_mean']} MB (max {result['soak']['rss_mb_max']})", flush=True)
    if args.model is not None:
        name = f"runtime_throughput_{args.model.parent.name}" + ("_int8" if args.int8 else "") + (f"_{args.tag}" if args.tag else "")
    else:
        name = ("runtime_throughput" + ("" if args.generator == "nice_unet" else f"_{args.generator}") + ("_int8" if args.int8 else "")
                + (f"_kept{args.kept_fraction:g}" if sparsity else "") + ("_trained" if trained else "") + (f"_{args.tag}" if args.tag else ""))
    print(write_result(name, result))


if __name__ == "__main__":
    main()
