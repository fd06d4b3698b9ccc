import subprocess
import sys
import zipfile

import pytest

import keepbits
from keepbits import registry
from keepbits.cli import main


def test_import_does_not_load_torch():
    code = "import sys, keepbits, keepbits.core, keepbits.data, keepbits.cli, keepbits.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert keepbits.__version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "train" in capsys.readouterr().out


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "keepbits", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "classifier" in out.stdout


def test_registry_lists_every_classifier_and_rejects_unknown():
    assert {"lenet5", "resnet18", "resnet20", "vgg16_bn", "nf_wrn16_2"} <= set(registry.names("classifier"))
    with pytest.raises(keepbits.InputError, match="unknown classifier 'resnet9000'"):
        registry.spec("resnet9000", "classifier")


def test_wheel_holds_every_layer(tmp_path):
    """`pip install .` (src/ layout) must give the same imports as the editable install."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("keepbits-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("keepbits/__init__.py", "keepbits/training/classifier.py", "keepbits/export/__init__.py",
                   "keepbits/core/compose.py", "keepbits/runtime/pipeline.py", "keepbits/audit/cid_report.py",
                   "keepbits/assets/mnist_sample.npz", "keepbits/assets/lite0_nice_bundle.zip",
                   "keepbits/assets/bottle_clip.mp4", "keepbits/assets/LICENSE-CC-BY-4.0"):
        assert module in names, module
