"""Bundle format: round trip (folder and zip), tampering, paths escaping the bundle."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from keepbits.bundle import FORMAT_VERSION, Manifest, load_bundle, write_bundle
from keepbits.errors import BundleError


def _model_bytes(external: str | None = None) -> bytes:
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("image", "logits")]
    init = []
    nodes = [helper.make_node("Identity", ["image"], ["logits"])]
    if external:
        w = numpy_helper.from_array(np.zeros(1, np.float32), "w")
        w.data_location = TensorProto.EXTERNAL
        w.ClearField("raw_data")
        w.external_data.add(key="location", value=external)
        init.append(w)
    return helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], init)).SerializeToString()


def _manifest(**kw) -> Manifest:
    base = dict(input_shape=[3, 8, 8], input_dtype="uint8", input_layout="NHWC", mean=[0.5] * 3, std=[0.25] * 3,
                class_names=["a", "b"], block_size=2, mask_threshold=0.5, generator="g", classifier="c")
    return Manifest(**{**base, **kw})


@pytest.mark.parametrize("suffix", ["", ".zip"])
def test_round_trip(tmp_path, suffix):
    out = write_bundle(tmp_path / f"b{suffix}", _manifest(provenance={"command": "x"}), {"model.onnx": _model_bytes(), "extra/notes.txt": b"hi"})
    bundle = load_bundle(out)
    assert bundle.manifest.block_size == 2 and bundle.manifest.pixel_scale == 255.0
    assert bundle.manifest.format_version == FORMAT_VERSION
    assert bundle.model_path.read_bytes() == _model_bytes()
    assert bundle.path("extra/notes.txt").read_bytes() == b"hi"
    assert load_bundle(out, expected_digest=bundle.digest).digest == bundle.digest
    with pytest.raises(BundleError, match="does not match"):
        load_bundle(out, expected_digest="0" * 64)
    with pytest.raises(BundleError, match="64 hex digits"):
        load_bundle(out, expected_digest="xyz")
    with pytest.raises(BundleError, match="not a file of this bundle"):
        bundle.path("manifest.json")


def test_a_bundle_is_known_by_its_content_not_its_name(tmp_path):
    """A zip bundle renamed to .onnx opens (it was "an ONNX model, not a keepbits bundle"); a real
    ONNX file gets the hint with its full path (the folder was dropped)."""
    import shutil

    out = write_bundle(tmp_path / "b.zip", _manifest(), {"model.onnx": _model_bytes()})
    shutil.copy(out, tmp_path / "renamed.onnx")
    assert load_bundle(tmp_path / "renamed.onnx").digest == load_bundle(out).digest
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model.onnx").write_bytes(_model_bytes())
    with pytest.raises(BundleError, match=f"--classifier {tmp_path / 'sub' / 'model.onnx'}"):
        load_bundle(tmp_path / "sub" / "model.onnx")


def test_overwrite_replaces_a_bundle_only(tmp_path):
    """overwrite=True replaces a keepbits bundle (folder or zip), never another folder, a folder
    bundle with the user's own files added, or a zip that is not a bundle; a folder bundle gets
    the umask's permissions (a temp folder's 0700 hid it from other users)."""
    import os
    import stat

    files = {"model.onnx": _model_bytes()}
    assert zipfile.is_zipfile(write_bundle(tmp_path / "UP.ZIP", _manifest(), files))  # the suffix in any case
    for name in ("b", "b.zip"):
        write_bundle(tmp_path / name, _manifest(), files)
        write_bundle(tmp_path / name, _manifest(generator="g2"), files, overwrite=True)
        assert load_bundle(tmp_path / name).manifest.generator == "g2"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o777 & ~umask
    (tmp_path / "b" / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jpg").write_bytes(b"a photo")
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as zf:
        zf.writestr("a.jpg", b"x")
    with zipfile.ZipFile(tmp_path / "b.zip", "a") as zf:  # a note added to an archive bundle is the user's too
        zf.writestr("notes.txt", "mine")
    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose: written into without overwrite
    assert load_bundle(write_bundle(tmp_path / "empty", _manifest(), files)).manifest.generator == "g"
    for target, why in (("b", r"holds files that are not the bundle's \(notes.txt\)"), ("data", "is not a keepbits bundle"),
                        ("photos.zip", "is not a keepbits bundle"), ("b.zip", r"holds files that are not the bundle's \(notes.txt\)")):
        with pytest.raises(BundleError, match=why):
            write_bundle(tmp_path / target, _manifest(), files, overwrite=True)
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine" and (tmp_path / "photos.zip").stat().st_size > 0


def test_tampered_file_rejected(tmp_path):
    out = write_bundle(tmp_path / "b", _manifest(), {"model.onnx": _model_bytes()})
    data = bytearray((out / "model.onnx").read_bytes())
    data[-1] ^= 1
    (out / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx was modified"):
        load_bundle(out)


def test_tampered_archive_rejected(tmp_path):
    out = write_bundle(tmp_path / "b.zip", _manifest(), {"model.onnx": _model_bytes()})
    with zipfile.ZipFile(out) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["model.onnx"] = _model_bytes() + b"\x00"
    with zipfile.ZipFile(out, "w") as zf:
        for n, d in members.items():
            zf.writestr(n, d)
    with pytest.raises(BundleError, match="modified"):
        load_bundle(out)


@pytest.mark.parametrize("name", ["../evil.onnx", "/etc/passwd", "a/../../x", "./model.onnx"])
def test_paths_outside_refused(tmp_path, name):
    out = write_bundle(tmp_path / "b", _manifest(), {"model.onnx": _model_bytes()})
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][name] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(out)


def test_symlink_refused(tmp_path):
    secret = tmp_path / "secret.onnx"
    secret.write_bytes(_model_bytes())
    out = write_bundle(tmp_path / "b", _manifest(), {"model.onnx": _model_bytes()})
    (out / "model.onnx").unlink()
    (out / "model.onnx").symlink_to(secret)
    with pytest.raises(BundleError, match="symlink"):
        load_bundle(out)


def test_zip_slip_refused(tmp_path):
    """A manifest listing ``../escape.txt`` is refused; an unlisted member of that name is never read."""
    good = write_bundle(tmp_path / "good.zip", _manifest(), {"model.onnx": _model_bytes()})
    with zipfile.ZipFile(good) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    for listed in (True, False):
        bad = tmp_path / f"bad{listed}.zip"
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("manifest.json", json.dumps({**manifest, "files": {**manifest["files"], "../escape.txt": "0" * 64}})
                        if listed else src.read("manifest.json"))
            zf.writestr("model.onnx", src.read("model.onnx"))
            zf.writestr("../escape.txt", "x")
        if listed:
            with pytest.raises(BundleError, match="outside the bundle"):
                load_bundle(bad)
        else:
            assert not (load_bundle(bad).root / ".." / "escape.txt").exists()
    assert not (tmp_path.parent / "escape.txt").exists()


def test_external_data_outside_refused(tmp_path):
    out = write_bundle(tmp_path / "b", _manifest(), {"model.onnx": _model_bytes(external="../../w.bin")})
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(out)
    out2 = write_bundle(tmp_path / "c", _manifest(), {"model.onnx": _model_bytes(external="w.bin")})
    with pytest.raises(BundleError, match="not a listed bundle file"):
        load_bundle(out2)


def test_bad_manifest_fields(tmp_path):
    with pytest.raises(BundleError, match="block_size"):
        write_bundle(tmp_path / "b", _manifest(block_size=0), {"model.onnx": _model_bytes()})
    with pytest.raises(BundleError, match="mean must be 3"):
        write_bundle(tmp_path / "b", _manifest(mean=[0.5]), {"model.onnx": _model_bytes()})
    with pytest.raises(BundleError, match="output_names"):  # x̃ may be left out, the mask may not
        write_bundle(tmp_path / "b", _manifest(output_names=["logits", "mixed"]), {"model.onnx": _model_bytes()})
    assert _manifest(output_names=["logits", "mask"]).output_names == ["logits", "mask"]
    out = write_bundle(tmp_path / "b", _manifest(), {"model.onnx": _model_bytes()})
    manifest = json.loads((out / "manifest.json").read_text())
    for patch, msg in [({"format_version": 99}, "version 99"), ({"surprise": 1}, "unknown manifest fields")]:
        (out / "manifest.json").write_text(json.dumps({**manifest, **patch}))
        with pytest.raises(BundleError, match=msg):
            load_bundle(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(out)
    with pytest.raises(BundleError, match="exists"):
        write_bundle(out, _manifest(), {"model.onnx": _model_bytes()})
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
