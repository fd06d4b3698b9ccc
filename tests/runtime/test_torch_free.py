"""The device layer runs without torch and onnx: every runtime, codec, core, data and bundle
module imports, the shipped bundle runs through Pipeline, payloads round-trip through the codec,
``keepbits demo`` writes its outputs and ``keepbits info``, ``decode``, ``eval``, ``explain``,
``compare`` (bundles) and ``doctor`` run, all in an interpreter where torch and onnx cannot be imported."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

BLOCKED = ("torch", "torchvision", "onnx", "onnxscript", "onnx2torch", "matplotlib")

SCRIPT = textwrap.dedent("""
    import importlib, importlib.abc, json, pkgutil, sys, tempfile
    from pathlib import Path

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    import keepbits
    import numpy as np

    imported = []
    for package in ("keepbits.core", "keepbits.codec", "keepbits.data", "keepbits.runtime"):
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, package + "."):
            importlib.import_module(info.name)
            imported.append(info.name)
    for module in ("keepbits.bundle", "keepbits.native", "keepbits.errors", "keepbits.registry", "keepbits.cli"):
        importlib.import_module(module)
        imported.append(module)

    from keepbits.cli.demo import DEMO_BUNDLE
    from keepbits.codec import decode
    from keepbits.runtime import Pipeline

    pipe = Pipeline.from_bundle(DEMO_BUNDLE)
    frame = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    result = pipe(frame)
    image, mask, meta = decode(result.payload)
    assert image.shape == result.image.shape and mask.shape == result.mask.shape
    assert np.array_equal(image, result.mixed), "lossless payload must rebuild x̃ exactly"

    from keepbits.cli import main
    out = Path(tempfile.mkdtemp()) / "demo"
    code = main(["-q", "demo", "--out", str(out), "--max-frames", "4"])
    summary = json.loads((out / "summary.json").read_text())
    payloads = sorted((out / "payloads").iterdir())
    for path in payloads:
        decode(path.read_bytes())

    import contextlib, io, cv2
    photos = out.parent / "photos"
    photos.mkdir()
    for i in range(2):
        cv2.imwrite(str(photos / f"p{i}.png"), np.random.default_rng(i).integers(0, 256, (40 + i, 50, 3), dtype=np.uint8))
    commands = {
        "info": ["info", "--model", str(DEMO_BUNDLE), "--json"],
        "decode": ["decode", "--payloads", str(out / "payloads"), "--out", str(out.parent / "decoded")],
        "eval": ["eval", "--model", str(DEMO_BUNDLE), "--data", str(photos), "--codecs", "png",
                 "--baselines", "jpeg", "--baseline-qualities", "50", "--out", str(out.parent / "eval")],
        "explain": ["explain", "--model", str(DEMO_BUNDLE), "--data", str(photos), "--out", str(out.parent / "look")],
        "compare": ["compare", "--model", str(DEMO_BUNDLE) + "@functions", "--model", str(DEMO_BUNDLE), "--data", str(photos)],
        "doctor": ["doctor"],
    }
    codes, outputs = {}, {}
    for name, argv in commands.items():
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            codes[name] = main(["-q", *argv])
        outputs[name] = json.loads(stdout.getvalue())
    doctor = outputs["doctor"]["checks"]
    print(json.dumps({"imported": len(imported), "demo_exit": code, "written": summary["written"],
                      "payloads": len(payloads), "torch": "torch" in sys.modules, "onnx": "onnx" in sys.modules,
                      "codes": codes, "decoded": outputs["decode"]["decoded"], "eval_images": outputs["eval"]["num_images"],
                      "problems": sorted(k for k, c in doctor.items() if c["status"] == "problem"),
                      "torch_check": doctor["torch"]["detail"], "self_test": doctor["self_test"]["status"]}))
""")


def test_runtime_and_demo_run_with_torch_and_onnx_unimportable():
    code = f"BLOCKED = {BLOCKED!r}\n" + SCRIPT
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["imported"] >= 15
    assert report["demo_exit"] == 0 and report["written"] == 4 and report["payloads"] == 4
    assert not report["torch"] and not report["onnx"]
    # info, decode, eval, explain, compare (bundles) run without torch and onnx; doctor finds the
    # installed-but-unimportable torch (here: blocked) a broken promise and exits 1, naming it
    codes = report["codes"]
    assert {k: codes[k] for k in ("info", "decode", "eval", "explain", "compare")} == dict.fromkeys(("info", "decode", "eval", "explain", "compare"), 0)
    assert report["decoded"] == 4 and report["eval_images"] == 2 and report["self_test"] == "ok"
    assert codes["doctor"] == 1 and report["problems"] == ["extras", "torch"] and "blocked" in report["torch_check"]


@pytest.mark.parametrize("argv, extra", [
    (["train", "classifier", "--data", ".", "--arch", "lenet5", "--out", "/tmp/x"], "keepbits[train]"),
    (["audit", "cid", "--model", "m.pt", "--data", ".", "--out", "/tmp/x"], "keepbits[audit]"),
])
def test_cli_names_the_missing_extra(argv, extra):
    """A command that needs torch says which install set provides it (an audit: the audits' own),
    in one line, exit 2."""
    code = (f"BLOCKED = ('torch',)\n" + SCRIPT.split("import keepbits\n")[0]
            + f"from keepbits.cli import main\nsys.exit(main({argv!r}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and extra in lines[0] and "Traceback" not in done.stderr


def test_sis_audit_of_an_onnx_model_runs_without_torch(tmp_path):
    """ONNX models are audited by ONNX Runtime alone: ``keepbits audit sis`` (default ``--device
    auto``, which is the CPU where torch cannot be imported) runs with torch and onnx blocked;
    ``--device cuda`` there is one line, exit 2."""
    import pytest

    torch = pytest.importorskip("torch")
    import numpy as np

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3)).eval()
    torch.onnx.export(net, (torch.zeros(1, 1, 6, 6),), str(tmp_path / "m.onnx"), input_names=["x"], output_names=["logits"],
                      dynamo=False, dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).integers(0, 256, (6, 6, 6, 1), dtype=np.uint8), y=np.arange(6) % 3)
    audit = ["audit", "sis", "--model", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--num-images", "3",
             "--threshold", "0.1", "--thresholds", "0.1"]
    code = (f"BLOCKED = {BLOCKED!r}\n" + SCRIPT.split("import keepbits\n")[0]
            + "from keepbits.cli import main\n"
            + f"first = main(['-q', *{audit!r}, '--out', {str(tmp_path / 'a')!r}])\n"
            + f"second = main(['-q', *{audit!r}, '--out', {str(tmp_path / 'b')!r}, '--device', 'cuda'])\n"
            + f"gradient = main(['-q', *{audit!r}, '--out', {str(tmp_path / 'c')!r}, '--method', 'gradient'])\n"
            + "print(json.dumps({'first': first, 'second': second, 'gradient': gradient, 'torch': 'torch' in sys.modules}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"first": 0, "second": 2, "gradient": 2, "torch": False}
    assert json.loads((tmp_path / "a" / "report.json").read_text())["data"]["summary"]["backselect_runs"] == 3
    assert "torch is not installed" in done.stderr and "Traceback" not in done.stderr
    assert "gradient BackSelect needs torch, which is not installed here (pip install 'keepbits[train,audit]')" in done.stderr
