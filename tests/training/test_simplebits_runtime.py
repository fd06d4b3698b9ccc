"""SimpleBits in the runtime: simplebits checkpoint -> bundle (explain "simplify") -> Pipeline ->
payload mode "simplified" -> decode / keepbits run / keepbits receive."""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import zlib

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch

from keepbits import registry
from keepbits.bundle import load_bundle
from keepbits.cli import main
from keepbits.codec import decode
from keepbits.codec.container import CRC
from keepbits.errors import BundleError, DecodeError, InputError
from keepbits.export import export_onnx
from keepbits.runtime import Pipeline
from keepbits.runtime.synthetic import toy_bundle
from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, save_checkpoint
from keepbits.export import SimplifierGraph
from keepbits.training.simplebits import load_simplebits

SIZE = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny untrained simplebits checkpoint, simplifier pushed off the identity."""
    torch.manual_seed(0)
    sim_kw = {"in_channels": 3, "base": 4}
    clf_kw = {"in_channels": 3, "num_classes": 3, "image_size": [SIZE, SIZE]}
    sim = registry.build("simplebits_unet", **sim_kw)
    sim.weight.data.fill_(0.3)  # off the identity, so the U-Net is exercised
    path = tmp_path_factory.mktemp("sb") / "sb.pt"
    save_checkpoint(path, Checkpoint(
        kind="simplebits", input_shape=[3, SIZE, SIZE], class_names=["cat", "dog", "owl"],
        normalization=Normalization([0.45, 0.4, 0.35], [0.25, 0.24, 0.26]),
        models={"simplifier": ModelEntry.of("simplebits_unet", sim_kw, sim),
                "classifier": ModelEntry.of("lenet5", clf_kw, registry.build("lenet5", **clf_kw))},
    ))
    return path


@pytest.fixture(scope="module")
def bundle(checkpoint):
    return export_onnx(checkpoint, checkpoint.parent / "simplify.zip")


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (24 + 4 * i, 40, 3), dtype=np.uint8) for i in range(n)]


def test_bundle_manifest_and_onnx_match_torch(bundle, checkpoint):
    m = bundle.manifest
    assert (m.explain, m.output_names, m.classify_on) == ("simplify", ["logits", "simplified"], "simplified")
    assert (m.input_layout, m.input_dtype, m.generator, m.custom_ops, m.dynamic_size) == ("NHWC", "uint8", "simplebits_unet", [], False)
    assert json.loads((bundle.root / "manifest.json").read_text())["explain"] == "simplify"
    simplifier, classifier, _ = load_simplebits(checkpoint)
    reference = SimplifierGraph(simplifier, classifier).eval()  # float N×C×H×W on [0, 1]
    pixels = np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    logits, simplified = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"]).run(None, {"image": pixels})
    with torch.no_grad():
        ref_logits, ref_simplified = reference(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)
    assert np.abs(logits - ref_logits.numpy()).max() < 1e-4
    assert np.abs(simplified / 255 - ref_simplified.permute(0, 2, 3, 1).numpy()).max() < 1e-4
    assert np.abs(simplified / 255 - pixels / 255).max() > 1e-2  # the simplifier does change the image


def test_float_bundle_and_nice_manifests_stay_readable(checkpoint, tmp_path):
    b = export_onnx(checkpoint, tmp_path / "f", input_dtype="float32")
    assert (b.manifest.input_layout, b.manifest.explain) == ("NCHW", "simplify")
    r = Pipeline.from_bundle(b.source)(_frames(1)[0])
    assert r.simplified.dtype == np.uint8 and r.simplified.shape == (SIZE, SIZE, 3)
    nice = toy_bundle(tmp_path / "toy", size=8)  # NICE bundles do not write the key: older readers still load them
    assert "explain" not in json.loads((nice / "manifest.json").read_text())
    assert load_bundle(nice).manifest.explain == "mask"
    with pytest.raises(InputError, match="classify_on"):
        export_onnx(checkpoint, tmp_path / "g", classify_on="original")


def test_pipeline_results_and_lossless_payload(bundle):
    pipe = Pipeline.from_bundle(bundle.source)
    frames = _frames(3)
    results = pipe.process_batch(frames)
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    for frame, r in zip(frames, results):
        assert r.mask is None and r.kept_fraction is None and r.label in ("cat", "dog", "owl")
        assert abs(float(r.probabilities.sum()) - 1) < 1e-5 and r.score == pytest.approx(float(r.probabilities.max()))
        assert set(r.timings) == {"preprocess", "model", "postprocess", "encode"}
        _, out = session.run(None, {"image": r.image[None]})
        assert np.array_equal(r.simplified, np.clip(np.rint(out[0]), 0, 255).astype(np.uint8))
        image, mask, meta = decode(r.payload)
        assert mask is None and np.array_equal(image, r.simplified) and np.array_equal(image, r.mixed)
        assert (meta.mode, meta.codecs, meta.label, meta.name, meta.sequence) == ("simplified", {"simplified": "png"}, r.label_index, r.label, r.sequence)
        assert meta.roi == r.fit.roi and meta.source_size == (frame.shape[1], frame.shape[0])
    assert pipe.describe()["explain"] == "simplify" and pipe.describe()["codec"]["mode"] == "simplified"


def test_lossy_payload_and_mode_mismatch(bundle, tmp_path):
    r = Pipeline.from_bundle(bundle.source, codec="jpeg", quality=70)(_frames(1)[0])
    image, _, meta = decode(r.payload)
    # JPEG q70 of a noisy 32×32 image: close on average, not exact
    assert meta.codecs == {"simplified": "jpeg"} and 0 < np.abs(image.astype(int) - r.simplified).mean() < 32
    with pytest.raises(InputError, match="does not fit"):
        Pipeline.from_bundle(bundle.source, mode="blocks")
    with pytest.raises(InputError, match="does not fit"):
        Pipeline.from_bundle(toy_bundle(tmp_path / "toy", size=8), mode="simplified")


def test_corrupt_payload_raises_decode_error(bundle):
    payload = Pipeline.from_bundle(bundle.source)(_frames(1)[0]).payload
    flipped = bytearray(payload)
    flipped[len(payload) // 2] ^= 0x40
    for bad in (bytes(flipped), payload[:-7], payload[:60]):
        with pytest.raises(DecodeError):
            decode(bad)
    body = bytearray(payload[:-CRC.size])
    body[5] = 1  # claims paper mode: the section set no longer fits, even with a valid CRC
    with pytest.raises(DecodeError, match="sections"):
        decode(bytes(body) + CRC.pack(zlib.crc32(bytes(body))))


def test_tampered_bundle_is_rejected(bundle, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(bundle.root, folder)
    model = folder / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-10] ^= 1
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="modified"):
        Pipeline.from_bundle(folder)
    shutil.copy(bundle.root / "model.onnx", model)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["output_names"] = ["logits", "mask", "mixed"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="output_names"):
        load_bundle(folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_export_run_and_receive(checkpoint, tmp_path, capsys):
    out = tmp_path / "cli.bundle"
    assert main(["-q", "export", "onnx", "--model", str(checkpoint), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["explain"] == "simplify"
    src = tmp_path / "frames"
    src.mkdir()
    for i, frame in enumerate(_frames(4)):
        cv2.imwrite(str(src / f"{i}.png"), frame)
    port = _free_port()
    rx = threading.Thread(target=main, args=(["-q", "receive", "--listen", f"127.0.0.1:{port}", "--out", str(tmp_path / "rx"),
                                              "--once", "--idle-timeout", "20"],))
    rx.start()
    time.sleep(0.3)
    rc = main(["-q", "run", "--model", str(out), "--source", str(src), "--sink", f"files:{tmp_path / 'files'}",
               "--sink", f"video:{tmp_path / 'out.mp4'}", "--sink", f"tcp:127.0.0.1:{port}", "--compare", "jpeg", "paper", "lossless"])
    rx.join(30)
    text, printed = capsys.readouterr().out, []
    while text.strip():  # run's summary and receive's counters, in either order
        obj, end = json.JSONDecoder().raw_decode(text.strip())
        printed.append(obj)
        text = text.strip()[end:]
    summary = next(p for p in printed if "written" in p)
    assert rc == 0 and not rx.is_alive()
    assert summary["written"] == 4 and summary["errors"] == 0 and summary["kept_fraction_mean"] is None
    assert summary["pipeline"]["codec"]["mode"] == "simplified" and "lossless_bytes" in summary and "paper_bytes" not in summary
    assert (tmp_path / "out.mp4").stat().st_size > 0
    for payload in sorted((tmp_path / "files" / "payloads").glob("*.kbit")):
        assert decode(payload.read_bytes())[2].mode == "simplified"
    received = [json.loads(x) for x in (tmp_path / "rx" / "frames.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in received] == ["simplified"] * 4 and len(list((tmp_path / "rx").glob("*.png"))) == 4


def test_eval_explain_and_decode_of_a_simplebits_bundle(bundle, tmp_path):
    """keepbits eval sweeps the codec of the simplified image, explain shows it, decode writes no mask."""
    from keepbits.runtime.evaluate import rate_accuracy
    from keepbits.runtime.explain import look
    from keepbits.runtime.receiver import decode_files

    pipe = Pipeline.from_bundle(bundle.source)
    frames = _frames(4)
    result = rate_accuracy(pipe, frames, None, codecs=["png", "webp"], qualities=[60], baselines=["png"])
    assert [r["series"] for r in result["payload"]] == ["simplified png", "simplified webp"]
    lossless = result["payload"][0]
    assert lossless["mode"] == "simplified" and lossless["threshold"] is None and "kept_fraction" not in lossless
    seen = look(pipe, frames[0])
    assert seen.mask is None and seen.keep is None and set(seen.panels()) == {"mixed"} and seen.mixed.shape == frames[0].shape
    (tmp_path / "p").mkdir()
    for i, r in enumerate(pipe.process_batch(frames)):
        (tmp_path / "p" / f"{i}.kbit").write_bytes(r.payload)
    summary = decode_files([tmp_path / "p"], tmp_path / "out")
    assert summary["decoded"] == 4 and not list((tmp_path / "out").glob("*_mask.png"))
