"""Hostile bundles: zip faults, manifest fields of the wrong type or out of bounds, a manifest
that disagrees with its graph, unlisted members, temp folders. Every failure is a
BundleError naming the field or member (issue 20, items 1-3)."""
from __future__ import annotations

import hashlib
import json
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from keepbits.bundle import Manifest, load_bundle, write_bundle
from keepbits.errors import BundleError
from keepbits.runtime import Pipeline
from keepbits.runtime.synthetic import toy_bundle


def _model_bytes() -> bytes:
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("image", "logits")]
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g", io[:1], io[1:])
    return helper.make_model(graph).SerializeToString()


def _manifest(**kw) -> Manifest:
    base = dict(input_shape=[3, 8, 8], input_dtype="uint8", input_layout="NHWC", mean=[0.5] * 3, std=[0.25] * 3,
                class_names=["a", "b"], block_size=2, mask_threshold=0.5, generator="g", classifier="c")
    return Manifest(**{**base, **kw})


def _rezip(src: Path, dst: Path, *, manifest: dict | None = None, extra: dict[str, bytes] | None = None,
           compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """Copy the archive ``src`` to ``dst``, optionally with another manifest and more members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name == "manifest.json" and manifest is not None:
                data = json.dumps(manifest).encode()
            zout.writestr(name, data)
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return dst


def _central_entry(data: bytes, name: str) -> int:
    """Offset of ``name``'s central-directory header in the archive bytes ``data``."""
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        n = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46:pos + 46 + n] == name.encode():
            return pos
        pos = data.find(b"PK\x01\x02", pos + 4)
    raise KeyError(name)


@pytest.fixture
def good_zip(tmp_path) -> Path:
    return write_bundle(tmp_path / "good.zip", _manifest(), {"model.onnx": _model_bytes() * 20})


def _patched(good: Path, out: Path, edit) -> Path:
    data = bytearray(good.read_bytes())
    edit(data)
    out.write_bytes(bytes(data))
    return out


def _flip_compressed_byte(data: bytearray) -> None:
    with zipfile.ZipFile(__import__("io").BytesIO(bytes(data))) as zf:
        info = zf.getinfo("model.onnx")
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_len + extra_len + info.compress_size // 2] ^= 0x55


def _central(name: str, offset: int, fmt: str, value: int):
    def edit(data: bytearray) -> None:
        struct.pack_into(fmt, data, _central_entry(bytes(data), name) + offset, value)
    return edit


def _or_flag(name: str, bit: int):
    def edit(data: bytearray) -> None:
        pos = _central_entry(bytes(data), name) + 8
        struct.pack_into("<H", data, pos, struct.unpack_from("<H", data, pos)[0] | bit)
    return edit


@pytest.mark.parametrize("edit, message", [
    (_flip_compressed_byte, "'model.onnx' cannot be read"),                       # BadZipFile: Bad CRC-32
    (_central("model.onnx", 24, "<I", 100), "model.onnx"),                       # uncompressed size lies (smaller)
    (_central("model.onnx", 24, "<I", 1 << 20), "model.onnx"),                   # ... (larger)
    (_or_flag("model.onnx", 0x1), "'model.onnx' cannot be read"),                # encrypted flag: RuntimeError
    (_central("model.onnx", 10, "<H", 99), "'model.onnx' cannot be read"),       # unknown method: NotImplementedError
    (_central("manifest.json", 10, "<H", 99), "'manifest.json' cannot be read"),
], ids=["crc", "size-smaller", "size-larger", "encrypted", "method", "manifest-method"])
def test_zip_faults_are_bundle_errors(good_zip, tmp_path, edit, message):
    bad = _patched(good_zip, tmp_path / "bad.zip", edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(bad)


def test_not_a_zip_and_duplicate_members(good_zip, tmp_path):
    (tmp_path / "text.zip").write_text("not a zip")
    with pytest.raises(BundleError, match="not a readable bundle archive"):
        load_bundle(tmp_path / "text.zip")
    with zipfile.ZipFile(good_zip) as zf:
        model = zf.read("model.onnx")
    with pytest.warns(UserWarning):  # zipfile warns about the duplicate name it writes
        dup = _rezip(good_zip, tmp_path / "dup.zip", extra={"model.onnx": model[:-1]})
    with pytest.raises(BundleError, match="appears twice"):
        load_bundle(dup)
    with zipfile.ZipFile(tmp_path / "nice.pt", "w") as zf:  # torch.save's layout: a checkpoint where a bundle belongs
        zf.writestr("nice/data.pkl", b"")
    with pytest.raises(BundleError, match=r"nice.pt: a torch checkpoint, not a model bundle: .*keepbits export onnx --model"):
        load_bundle(tmp_path / "nice.pt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("readme.txt", b"")
    with pytest.raises(BundleError, match=r"no manifest.json \(is this a keepbits bundle\?\)"):
        load_bundle(tmp_path / "other.zip")


def _manifest_dict(good: Path) -> dict:
    with zipfile.ZipFile(good) as zf:
        return json.loads(zf.read("manifest.json"))


@pytest.mark.parametrize("patch, field", [
    ({"input_shape": 5}, "input_shape"),
    ({"input_shape": [3, 100000, 100000]}, "input_shape"),
    ({"input_shape": [3, 8192, 8192]}, "input_shape"),         # sides fine, C*H*W over the bound
    ({"input_shape": [20000, 64, 64], "mean": [0.5] * 20000, "std": [0.25] * 20000}, "input_shape"),
    ({"mean": 5}, "mean"),
    ({"mean": [float("nan")] * 3}, "mean"),
    ({"std": ["a", "b", "c"]}, "std"),
    ({"mask_threshold": "x"}, "mask_threshold"),
    ({"mask_threshold": True}, "mask_threshold"),
    ({"files": ["model.onnx"]}, "files"),
    ({"block_size": 10**12}, "block_size"),
    ({"block_size": True}, "block_size"),
    ({"class_names": "ab"}, "class_names"),
    ({"class_names": ["a", {"b": 1}]}, "class_names"),
    ({"class_names": []}, "class_names"),
    ({"class_names": ["a", "b\x1b[2J"]}, "class_names\\[1\\] holds control characters"),
    ({"custom_ops": ["EvilOp"]}, "custom_ops"),
    ({"custom_ops": "MaskCompose"}, "custom_ops"),
    ({"input_dtype": ["uint8"]}, "input_dtype"),
    ({"opset": "18"}, "opset"),
    ({"dynamic_size": "yes"}, "dynamic_size"),
    ({"format_version": True}, "format version"),
    ({"provenance": [1]}, "provenance"),
    ({"generator": "x" * 5000}, "generator"),
    ({"classifier": "net\nkeepbits: error: fake"}, "classifier must be .* printable"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_manifest_fields_of_wrong_type_or_out_of_bounds(good_zip, tmp_path, patch, field):
    bad = _rezip(good_zip, tmp_path / "bad.zip", manifest={**_manifest_dict(good_zip), **patch})
    with pytest.raises(BundleError, match=field):
        load_bundle(bad)


def test_deeply_nested_and_oversized_manifests(good_zip, tmp_path):
    manifest = _manifest_dict(good_zip)
    text = json.dumps({**manifest, "provenance": {"x": "NEST"}}).replace('"NEST"', "[" * 100_000 + "]" * 100_000)
    with zipfile.ZipFile(good_zip) as zf, zipfile.ZipFile(tmp_path / "deep.zip", "w") as out:
        out.writestr("manifest.json", text)
        out.writestr("model.onnx", zf.read("model.onnx"))
    with pytest.raises(BundleError, match="nests too deeply"):
        load_bundle(tmp_path / "deep.zip")
    big = _rezip(good_zip, tmp_path / "big.zip", manifest={**manifest, "provenance": {"x": "y" * (2 << 20)}})
    with pytest.raises(BundleError, match="manifest.json has"):
        load_bundle(big)
    digits = json.dumps(manifest).replace('"block_size": 2', '"block_size": ' + "9" * 5000)
    with zipfile.ZipFile(good_zip) as zf, zipfile.ZipFile(tmp_path / "digits.zip", "w") as out:
        out.writestr("manifest.json", digits)
        out.writestr("model.onnx", zf.read("model.onnx"))
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path / "digits.zip")


def test_file_and_folder_of_the_same_name(good_zip, tmp_path):
    """Unlisted members ``a`` and ``a/b`` are never unpacked; a manifest listing both is refused."""
    extra = {"a": b"1", "a/b": b"2"}
    bundle = load_bundle(_rezip(good_zip, tmp_path / "ab.zip", extra=extra))
    assert not (bundle.root / "a").exists()
    manifest = _manifest_dict(good_zip)
    manifest["files"].update({k: hashlib.sha256(v).hexdigest() for k, v in extra.items()})
    with pytest.raises(BundleError, match="'a' is listed as a file and is also the folder"):
        load_bundle(_rezip(good_zip, tmp_path / "ab2.zip", manifest=manifest, extra=extra))


def test_only_listed_members_are_unpacked_and_close_removes_them(good_zip, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    noisy = _rezip(good_zip, tmp_path / "noisy.zip", extra={"junk.bin": bytes(1 << 20), "deep/x.txt": b"x"})
    bundle = load_bundle(noisy)
    assert sorted(p.name for p in bundle.root.rglob("*")) == ["manifest.json", "model.onnx"]
    bundle.close()
    assert not bundle.root.exists()
    pipe_bundle = toy_bundle(tmp_path / "toy.zip", size=16)
    for _ in range(5):
        with Pipeline.from_bundle(pipe_bundle) as pipe:
            assert pipe(np.zeros((8, 8, 3), np.uint8)).label == "dark"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_listed_member_that_unpacks_far_beyond_its_compressed_size_is_refused_unwritten(good_zip, tmp_path, monkeypatch):
    """A 64 MiB member of zeros (64 kB deflated) listed under a wrong hash was written to the temp
    folder in full before its hash failed (2 GiB from a 2 MB archive in a walkthrough)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    manifest = _manifest_dict(good_zip)
    manifest["files"]["weights.bin"] = "0" * 64
    bomb = _rezip(good_zip, tmp_path / "bomb.zip", manifest=manifest, extra={"weights.bin": bytes(64 << 20)})
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(BundleError, match=r"archive member 'weights.bin' would unpack to 67108864 bytes from \d+ compressed \(more than 100×"):
        load_bundle(bomb)
    # many members of 1 MiB each (each under the per-member size the check began at, then): refused one by one
    # and, below 64 KiB each, by their sum
    manifest = _manifest_dict(good_zip)
    pads = {f"pad/{i:03d}.bin": bytes(1 << 20) for i in range(4)}
    manifest["files"].update({name: hashlib.sha256(bytes(1 << 20)).hexdigest() for name in pads})
    with pytest.raises(BundleError, match=r"archive member 'pad/000.bin' would unpack to 1048576 bytes"):
        load_bundle(_rezip(good_zip, tmp_path / "mib.zip", manifest=manifest, extra=pads))
    manifest = _manifest_dict(good_zip)
    pads = {f"pad/{i:03d}.bin": bytes(60 << 10) for i in range(200)}
    digest = hashlib.sha256(bytes(60 << 10)).hexdigest()
    manifest["files"].update({name: digest for name in pads})
    with pytest.raises(BundleError, match=r"the listed files would unpack to \d+ bytes from \d+ compressed"):
        load_bundle(_rezip(good_zip, tmp_path / "many.zip", manifest=manifest, extra=pads))
    assert list((tmp_path / "tmp").iterdir()) == []


def test_listed_file_missing_from_archive(good_zip, tmp_path):
    manifest = _manifest_dict(good_zip)
    manifest["files"]["notes.txt"] = "0" * 64
    with pytest.raises(BundleError, match="'notes.txt' is not in the archive"):
        load_bundle(_rezip(good_zip, tmp_path / "m.zip", manifest=manifest))


# -- the manifest against the graph (ONNX Runtime's description of it, then one frame) ------
def _edit_manifest(folder: Path, **patch) -> Path:
    path = folder / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **patch}))
    return folder


def _static_graph_bundle(out: Path, classes: int, size: int) -> Path:
    """A plain-ONNX bundle with static H×W (= ``size``) and ``classes`` logits."""
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])),
        helper.make_node("ReduceMean", ["x", "axes"], ["pooled"], keepdims=0),
        helper.make_node("Constant", [], ["w"], value=helper.make_tensor("w", TensorProto.FLOAT, [3, classes], [0.01] * (3 * classes))),
        helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
        helper.make_node("Constant", [], ["perm_axes"], value=helper.make_tensor("perm_axes", TensorProto.INT64, [1], [3])),
        helper.make_node("ReduceMean", ["x", "perm_axes"], ["grey"], keepdims=1),
        helper.make_node("Transpose", ["grey"], ["mask"], perm=[0, 3, 1, 2]),
    ]
    graph = helper.make_graph(
        nodes, "static",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, size, size])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    manifest = Manifest(input_shape=[3, size, size], input_dtype="uint8", input_layout="NHWC", mean=[0.0] * 3, std=[1.0] * 3,
                        class_names=[str(i) for i in range(classes)], block_size=4, mask_threshold=0.5, generator="g",
                        classifier="c", output_names=["logits", "mask"], dynamic_size=False)
    return write_bundle(out, manifest, {"model.onnx": model.SerializeToString()})


@pytest.mark.parametrize("patch, message", [
    ({"input_dtype": "float32"}, "input_dtype"),                                     # float32 on a uint8 graph
    ({"input_name": "pixels"}, "input_name"),
    ({"input_layout": "NCHW"}, "input_shape, input_layout"),                         # the channel axis is static 3
    ({"input_shape": [3, 24, 24]}, "input_shape"),                                   # the graph fixes 16x16
    ({"class_names": ["a", "b"]}, "class_names"),                                    # another graph: 10 logits
    ({"output_names": ["logits", "mask", "mixed"]}, "no output 'mixed'"),
], ids=["dtype", "name", "layout", "shape", "classes", "outputs"])
def test_manifest_that_disagrees_with_the_graph(tmp_path, patch, message):
    bundle = _static_graph_bundle(tmp_path / "b", classes=10, size=16)
    Pipeline.from_bundle(bundle)  # the unedited bundle runs
    with pytest.raises(BundleError, match=message):
        Pipeline.from_bundle(_edit_manifest(bundle, **patch))


def test_runtime_takes_one_or_three_channels(tmp_path):
    """Bundles for the audits may hold any channel count; the runtime and the payload take 1 or 3."""
    folder = toy_bundle(tmp_path / "toy", size=16)
    with pytest.raises(BundleError, match="2 channels"):
        Pipeline.from_bundle(_edit_manifest(folder, input_shape=[2, 16, 16], mean=[0.0] * 2, std=[1.0] * 2))


def test_dynamic_graph_mismatch_is_caught_by_the_first_frame_at_load(tmp_path):
    """The toy graph's logits are N×2 with a static 2, its mask dynamic: three class names
    are refused by the description; a 1-channel manifest on the 3-channel graph by ORT itself."""
    folder = toy_bundle(tmp_path / "toy", size=16)
    with pytest.raises(BundleError, match="class_names"):
        Pipeline.from_bundle(_edit_manifest(folder, class_names=["a", "b", "c"]))
    folder = toy_bundle(tmp_path / "toy1", size=16)
    with pytest.raises(BundleError, match="input_shape"):
        Pipeline.from_bundle(_edit_manifest(folder, input_shape=[1, 16, 16], mean=[0.0], std=[1.0]))
