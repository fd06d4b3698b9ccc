"""RU decoders, their cache, and ``keepbits audit cid`` end to end on the bundled MNIST sample."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from keepbits import registry  # noqa: E402
from keepbits.audit.cid import CIDConfig  # noqa: E402
from keepbits.audit.cid_ru import DecoderConfig, reconstruction_uncertainty, train_decoder  # noqa: E402
from keepbits.cli import main  # noqa: E402
from keepbits.data import sample_mnist_path  # noqa: E402


def test_ru_decoders_are_cached_and_give_finite_maps(tmp_path):
    # the RU values themselves are checked against analytic answers in tests/audit/test_cid_ru.py
    class HalfBlind(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.cat([torch.zeros_like(x[..., :4]), x[..., 4:]], -1))

    torch.manual_seed(0)
    net = nn.Sequential(HalfBlind())
    x = torch.randn(64, 1, 8, 8)
    cfg = DecoderConfig(epochs=3, width=8, blocks=1, batch_size=16)
    dec, info = train_decoder(net, "0", x, cfg, cache_dir=tmp_path)
    assert not info["cached"] and np.isfinite(info["val_mse"])
    again, info2 = train_decoder(net, "0", x, cfg, cache_dir=tmp_path)
    assert info2["cached"] and len(list(tmp_path.glob("*.pt"))) == 1
    cached = next(tmp_path.glob("*.pt"))
    cached.write_bytes(cached.read_bytes()[:100])  # a damaged cache file (a killed write, a full disk) is trained again, not fatal
    _, info3 = train_decoder(net, "0", x, cfg, cache_dir=tmp_path)
    assert not info3["cached"] and train_decoder(net, "0", x, cfg, cache_dir=tmp_path)[1]["cached"]
    ru, fit = reconstruction_uncertainty(net, "0", again, x[:2], CIDConfig(max_steps=60, min_steps=20))
    assert ru.shape == (2, 8, 8) and np.isfinite(ru).all()
    assert fit["ratio"].shape == (2,) and fit["floor"].shape == (2, 8, 8)


def test_audit_cid_command_writes_the_report(tmp_path, capsys, caplog):
    from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, save_checkpoint

    torch.manual_seed(0)
    net = registry.build("lenet5")
    ckpt = save_checkpoint(tmp_path / "lenet" / "best.pt", Checkpoint(
        kind="classifier", models={"classifier": ModelEntry.of("lenet5", {}, net)}, input_shape=[1, 28, 28],
        normalization=Normalization([0.13], [0.31]), class_names=[str(i) for i in range(10)],
    ))
    # a box for every test image: the audited ones are a seeded sample of the split
    (tmp_path / "boxes.csv").write_text("index,x0,y0,x1,y1\n" + "".join(f"{i},4,4,24,24\n" for i in range(500)))
    args = ["audit", "cid", "--model", str(ckpt), "--data", str(sample_mnist_path()), "--layers", "features.1", "classifier.3",
            "--out", str(tmp_path / "out"), "--num-images", "2", "--max-steps", "30", "--min-steps", "10", "--ru",
            "--num-decoder-images", "40", "--decoder-epochs", "1", "--decoder-width", "8", "--decoder-blocks", "1",
            "--cache", str(tmp_path / "cache"), "--boxes", str(tmp_path / "boxes.csv")]
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    summary = report["data"]["lenet/best"]["summary"]
    assert summary["layer"] == ["features.1", "classifier.3"]
    moving = sum(1 for converged in summary["converged"] if converged < summary["images"])
    headline = capsys.readouterr().err.strip().splitlines()[-1]  # says when --max-steps cut maps short
    assert headline.startswith("keepbits: lenet/best: CID of 2 layers on 2 images") and ("still moving" in headline) == bool(moving)
    assert len(summary["ru_mean"]) == 2 and summary["concentration"][0] is not None
    assert "<svg" in (tmp_path / "out" / "report.html").read_text()
    assert "indices in the test split: " in report["meta"]["images"]  # what --boxes is keyed by, for the reader
    # boxes keyed by something else (the sample's positions, another split): said, not silently no concentration
    (tmp_path / "elsewhere.csv").write_text("index,x0,y0,x1,y1\n1000000,4,4,24,24\n")
    assert main(["audit", "cid", "--model", str(ckpt), "--data", str(sample_mnist_path()), "--layers", "features.1", "--out",
                 str(tmp_path / "o3"), "--num-images", "2", "--max-steps", "10", "--min-steps", "5",
                 "--boxes", str(tmp_path / "elsewhere.csv")]) == 0
    assert any("--boxes: none of its 1 boxes is for an audited image (indices in the test split: " in r.getMessage() for r in caplog.records)
    assert main(["audit", "cid", "--model", str(ckpt), "--data", str(sample_mnist_path()), "--layers", "nope",
                 "--out", str(tmp_path / "o2")]) == 2


def test_audit_cid_of_a_registry_classifier_with_its_weights_on_unlabelled_footage(tmp_path, capsys):
    """A reviewer's own classifier (a registry name + a state dict, its preprocessing from the options)
    audited on footage: nested folders and a video, fitted to the model's input; RU needs a data set."""
    import cv2

    torch.manual_seed(1)
    weights = tmp_path / "lenet.pth"
    torch.save(registry.build("lenet5").state_dict(), weights)
    footage = tmp_path / "footage"
    (footage / "day1" / "cam0").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        cv2.imwrite(str(footage / "day1" / "cam0" / f"{i}.png"), rng.integers(0, 256, (40, 56), dtype=np.uint8))
    writer = cv2.VideoWriter(str(footage / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (48, 36))
    for i in range(4):
        writer.write(np.full((36, 48, 3), 40 * i, np.uint8))
    writer.release()
    spec = ["--model", "lenet5", "--classifier-weights", str(weights), "--image-size", "28", "28", "--mean", "0.13", "--std", "0.31",
            "--resize-policy", "resize"]
    args = ["-q", "audit", "cid", *spec, "--data", str(footage), "--layers", "features.1", "--num-images", "3", "--max-steps", "20",
            "--min-steps", "5", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed["summary"]) == ["lenet5"] and printed["summary"]["lenet5"]["layer"] == ["features.1"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "footage: 3 images, 4 frames read" in report["meta"]["images"]
    assert main([*args[:-1], str(tmp_path / "o2"), "--ru"]) == 2
    assert "footage has no split to train RU decoders" in capsys.readouterr().err
    assert main([*args[:-1], str(tmp_path / "o3"), "--model", "lenet5", "lenet5"]) == 2  # one set of weights, two models
