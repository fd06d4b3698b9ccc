"""Hostile .npz files: headers claiming more data than the file holds, zip sizes beyond
deflate's ratio, huge or negative labels, corrupt files in footage folders, empty files. Each
is a clear InputError (or, inside a footage folder, a file skipped and counted), never a
large allocation, a hang or a traceback."""
import io
import zipfile

import numpy as np
import pytest

from keepbits.data import Footage, ImageDataset, has_split, load_dataset, load_npz
from keepbits.data.dataset import MAX_CLASSES
from keepbits.data.images import load_footage, load_images
from keepbits.data.stream import discover
from keepbits.errors import InputError


def _npy(shape: tuple[int, ...], dtype: str = "|u1", data: bytes = b"") -> bytes:
    """A .npy member whose header claims ``shape`` and ``dtype``, followed by ``data``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def _npz(path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)
    return path


def _good_x(n: int = 4) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.zeros((n, 8, 8, 3), np.uint8))
    return buffer.getvalue()


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_load_npz_refuses_a_header_claiming_more_than_the_member_holds(tmp_path, compression):
    path = _npz(tmp_path / "hugehdr.npz", {"x.npy": _npy((10**6, 1000, 1000, 3), data=bytes(100)),
                                            "y.npy": _npy((2,), "<i8", bytes(16))}, compression)
    with pytest.raises(InputError, match=r"hugehdr.npz: x.npy claims shape \(1000000, 1000, 1000, 3\)"):
        load_npz(path)
    with pytest.raises(InputError, match="hugehdr.npz"):
        load_images(path, num_images=2)


def test_load_npz_refuses_zero_size_items_claiming_a_huge_count(tmp_path):
    path = _npz(tmp_path / "names.npz", {"x.npy": _good_x(2), "y.npy": _npy((2,), "<i8", bytes(16)),
                                          "class_names.npy": _npy((10**13,), "<U0")})
    with pytest.raises(InputError, match=r"class_names.npy claims shape \(10000000000000,\)"):
        load_npz(path)


def test_a_deflated_member_beyond_deflates_ratio_is_refused(tmp_path):
    x = np.zeros((4, 8, 8, 3), np.uint8)
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x=x, y=np.arange(4))
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("x.npy")
    raw = bytearray(path.read_bytes())
    central = raw.index(b"PK\x01\x02", info.header_offset + info.compress_size)  # x.npy's directory entry (the first)
    assert raw[central + 46 : central + 46 + len("x.npy")] == b"x.npy"
    raw[central + 24 : central + 28] = (info.compress_size * 2000).to_bytes(4, "little")  # its uncompressed size
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="bomb.npz: x.npy .*deflate"):
        load_npz(path)


def test_footage_npz_with_a_huge_label_header_is_refused_or_skipped(tmp_path):
    folder = tmp_path / "ff"
    folder.mkdir()
    _npz(folder / "ybig.npz", {"x.npy": _good_x(), "y.npy": _npy((10**12,), "<i8", bytes(32))})
    with pytest.raises(InputError, match=r"ybig.npz: y.npy claims shape \(1000000000000,\)"):
        Footage([folder / "ybig.npz"])
    np.savez(folder / "good.npz", x=np.ones((3, 8, 8, 3), np.uint8))
    footage = Footage([folder])
    assert len(list(footage.read())) == 3
    assert footage.counts.as_dict() == {"images": 3, "frames": 0, "skipped": 1}


@pytest.mark.parametrize("shape", [(10**13, 1, 1), (10**13, 0, 0)])
def test_discover_refuses_a_huge_image_count_the_file_does_not_hold(tmp_path, shape):
    path = _npz(tmp_path / "many.npz", {"x.npy": _npy(shape, data=bytes(16))})
    with pytest.raises(InputError, match="many.npz"):
        discover([path])


def test_huge_and_negative_labels_are_refused(tmp_path):
    x = np.zeros((4, 2, 2, 1), np.uint8)
    with pytest.raises(InputError, match=f"label 1099511627776 is beyond the {MAX_CLASSES} classes allowed"):
        ImageDataset(x, np.array([0, 1, 2, 2**40]), [])
    with pytest.raises(InputError, match="negative label -3"):
        ImageDataset(x, np.array([0, 1, -3, 2]), [])
    with pytest.raises(InputError, match="negative label -1"):
        ImageDataset(x, np.array([-1, -1, -1, -1]), [])
    with pytest.raises(InputError, match=f"{MAX_CLASSES + 1} class names, more than the {MAX_CLASSES} classes allowed"):
        ImageDataset(x, np.zeros(4, np.int64), [str(i) for i in range(MAX_CLASSES + 1)])
    assert ImageDataset(x, np.array([0, 1, 2, MAX_CLASSES - 1]), []).num_classes == MAX_CLASSES
    np.savez(tmp_path / "ybig.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.array([0, 1, 2, 2**40]))
    with pytest.raises(InputError, match="ybig.npz: label 1099511627776 is beyond"):
        load_images(tmp_path / "ybig.npz", num_images=2)


def test_corrupt_npz_in_a_footage_folder_is_skipped_and_counted(tmp_path):
    folder = tmp_path / "ff1"
    folder.mkdir()
    (folder / "corrupt.npz").write_bytes(b"")
    np.savez(folder / "good.npz", x=np.full((5, 8, 8, 3), 7, np.uint8))
    (folder / "truncated.npz").write_bytes((folder / "good.npz").read_bytes()[:100])
    images = load_footage(folder)
    assert images.names == [f"good.npz[{i}]" for i in range(5)]
    assert images.counts == {"images": 5, "frames": 0, "skipped": 2}
    with pytest.raises(InputError, match="corrupt.npz: not a readable .npz file"):
        discover([folder / "corrupt.npz"])  # given by itself: an error


def test_an_empty_npz_is_a_clear_error(tmp_path):
    (tmp_path / "empty.npz").write_bytes(b"")
    assert not has_split(tmp_path / "empty.npz", "test")
    with pytest.raises(InputError, match="empty.npz: not a readable .npz file"):
        load_images(tmp_path / "empty.npz")
    with pytest.raises(InputError, match="empty.npz: not a readable .npz file"):
        load_dataset(tmp_path / "empty.npz")
