"""Model bundles: one folder (or one ``.zip`` file) holding an exported NICE or SimpleBits model.

A bundle is what ``keepbits export onnx`` writes and what the runtime loads::

    BUNDLE/
      manifest.json   # this module's Manifest, plus sha256 of every other file
      model.onnx      # image batch -> logits, mask (ẑ, NICE Eq. 11), mixed (x̃, Eq. 12)
                      # or, explain="simplify": logits, simplified (the SimpleBits simplifier's image)

Loading checks the format version, recomputes the sha256 of every file the manifest lists,
and refuses any path that would leave the bundle (absolute paths, ``..``, symlinks, ONNX
external data that is not a listed file). The hashes detect corruption and edits of
single files; they are not a signature: pin :attr:`Bundle.digest` (the sha256 of
``manifest.json``, which covers every file) to trust one specific bundle.

The format is documented in ``docs/bundle.md``. This module never imports torch.

Example:
    >>> import tempfile, pathlib
    >>> from onnx import TensorProto, helper
    >>> from keepbits.bundle import Manifest, write_bundle, load_bundle
    >>> io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("image", "logits")]
    >>> graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g", io[:1], io[1:])
    >>> m = Manifest(input_shape=[1, 28, 28], input_dtype="uint8", input_layout="NHWC",
    ...              mean=[0.5], std=[0.5], class_names=[str(i) for i in range(10)],
    ...              block_size=4, mask_threshold=0.5, generator="tiny", classifier="lenet5")
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "b"
    >>> _ = write_bundle(out, m, {"model.onnx": helper.make_model(graph).SerializeToString()})
    >>> load_bundle(out).manifest.block_size
    4
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping, Sequence

from keepbits._fs import sibling_temp
from keepbits.data.dataset import MAX_CLASSES
from keepbits.data.preprocess import RESIZE_POLICIES
from keepbits.errors import BundleError

FORMAT = "keepbits-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
#: The default-domain ONNX opsets a keepbits export writes (the custom ops' function bodies need 18).
MIN_OPSET, MAX_OPSET = 18, 23
#: Custom-op domain of the NICE nodes.
CUSTOM_DOMAIN = "keepbits"
#: The custom ops of that domain a manifest may list in ``custom_ops``.
CUSTOM_OPS = ("HardConcreteMask", "MixedResCompose", "MaskCompose")
#: Most bytes unpacked from an archive (sum of the listed files' sizes), against zip bombs.
MAX_ARCHIVE_BYTES = 8 << 30
#: Largest ``manifest.json`` read (bytes).
MAX_MANIFEST_BYTES = 1 << 20
#: Most bytes the listed archive members may unpack to per compressed byte, each above 64 KiB and
#: all together above 1 MiB: model weights deflate to about 1.1×, a zip bomb to 1,000× (refused
#: before anything is written; below 64 KiB a member is bounded by its size, 1,024 of them by 64 MiB).
MAX_COMPRESSION_RATIO = 100
#: Bounds of the manifest's numbers: model side and values C·H·W (a frame of the model size
#: is allocated per batch item), block size (the payload's u16 field), classes (``MAX_CLASSES``,
#: from :mod:`keepbits.data.dataset`: the payload's i16 class index), listed files, and
#: characters of any name.
MAX_INPUT_SIDE = 0xFFFF
MAX_INPUT_VALUES = 3 << 24
MAX_BLOCK_SIZE = 0xFFFF
MAX_FILES = 1024
MAX_NAME_CHARS = 1024
#: ONNX Runtime's spelling of the input dtypes (``NodeArg.type``).
ORT_TYPES = {"uint8": "tensor(uint8)", "float32": "tensor(float)"}

INPUT_DTYPES = ("uint8", "float32")
INPUT_LAYOUTS = ("NHWC", "NCHW")
TARGETS = ("onnxruntime", "tensorrt")
#: Explain stages: NICE's mask + mixed-resolution image, or the SimpleBits simplifier.
EXPLAIN = ("mask", "simplify")
#: Graph outputs and the ``classify_on`` values each explain stage allows.
EXPLAIN_OUTPUTS = {"mask": ["logits", "mask", "mixed"], "simplify": ["logits", "simplified"]}
#: Outputs a bundle may leave out: x̃, which the runtime never reads (its codec rebuilds x̃ from the hard mask).
OPTIONAL_OUTPUTS = ("mixed",)
EXPLAIN_CLASSIFY_ON = {"mask": ("original", "mixed"), "simplify": ("simplified",)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A finite JSON number (not a bool: JSON ``true`` is no number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about untrusted values."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def explain_outputs(explain: str, optional: bool = True) -> list[str]:
    """The graph outputs of an explain stage, with or without :data:`OPTIONAL_OUTPUTS`.

    Example:
        >>> from keepbits.bundle import explain_outputs
        >>> explain_outputs("mask", optional=False)
        ['logits', 'mask']
    """
    return [n for n in EXPLAIN_OUTPUTS[explain] if optional or n not in OPTIONAL_OUTPUTS]


@dataclass
class Manifest:
    """Everything a runtime needs to feed ``model.onnx`` and read its outputs.

    Inputs: one tensor ``input_name``, ``input_layout`` NHWC (``uint8``, 0..255) or NCHW
    (``float32``, 0..1); batch, height and width are dynamic, ``input_shape`` [C, H, W] is
    the training size. Normalisation ``(x/scale − mean)/std`` happens inside the graph.
    Outputs: ``logits`` N×K, ``mask`` N×1×H×W (ẑ ∈ [0, 1]), ``mixed`` x̃ in pixel space:
    same layout and scale as the input (0..255 for uint8 input), float32. With
    ``explain="simplify"`` (a SimpleBits model): ``logits`` of the simplified image and
    ``simplified`` in pixel space like ``mixed``; ``block_size``/``mask_threshold`` are unused
    (1 and 0.5) and ``generator`` names the simplifier.

    Frames reach ``input_shape`` by ``resize_policy`` (``resize``, ``center-crop`` with
    ``crop_fraction``, ``letterbox``: :func:`keepbits.data.fit_into`), the classifier's own
    preprocessing; bundles that do not record one are letterboxed.
    """

    input_shape: list[int]
    input_dtype: str
    input_layout: str
    mean: list[float]
    std: list[float]
    class_names: list[str]
    block_size: int
    mask_threshold: float
    generator: str
    classifier: str
    classify_on: str = "original"
    target: str = "onnxruntime"
    opset: int = MIN_OPSET
    #: False when the networks fix H×W to ``input_shape`` (only the batch is dynamic).
    dynamic_size: bool = True
    input_name: str = "image"
    output_names: list[str] = field(default_factory=lambda: ["logits", "mask", "mixed"])
    model_file: str = MODEL_NAME
    #: Custom ops used by the graph, e.g. ``["MaskCompose"]``; empty for a plain graph.
    custom_ops: list[str] = field(default_factory=list)
    #: True when every custom node has an ONNX function body (runs on any ONNX runtime).
    function_bodies: bool = True
    #: ``"mask"`` (NICE: ẑ and x̃) or ``"simplify"`` (SimpleBits: the simplified image).
    #: Written only when not ``"mask"``, so NICE bundles stay readable by older keepbits.
    explain: str = "mask"
    #: How frames reach the model size (:data:`keepbits.data.RESIZE_POLICIES`) and, for
    #: ``center-crop``, the share of the scaled short side kept. Written only when not the
    #: defaults (``letterbox``, 1.0), so such bundles stay readable by older keepbits.
    resize_policy: str = "letterbox"
    crop_fraction: float = 1.0
    #: Checkpoint sha256, command, settings, metrics, keepbits version, export time.
    provenance: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    #: Relative POSIX path -> sha256 hex of every file but ``manifest.json``.
    files: dict[str, str] = field(default_factory=dict)

    @property
    def pixel_scale(self) -> float:
        """255 for uint8 input, 1 for float input: the scale of the input and of ``mixed``."""
        return 255.0 if self.input_dtype == "uint8" else 1.0

    def validate(self, where: str = "manifest") -> None:
        """Raise :class:`BundleError` naming ``where`` and the first bad field: types first,
        then every number within its bound (``MAX_*`` of this module)."""
        def bad(msg: str) -> BundleError:
            return BundleError(f"{where}: {msg}")

        if self.format != FORMAT:
            raise bad(f"format is {_show(self.format)}, not {FORMAT!r}")
        if not _is_int(self.format_version) or self.format_version != FORMAT_VERSION:
            raise bad(f"bundle format version {_show(self.format_version)} is not supported (this keepbits reads {FORMAT_VERSION})")
        for name in ("input_dtype", "input_layout", "generator", "classifier", "classify_on", "target", "input_name",
                     "model_file", "explain"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS or not value.isprintable():
                raise bad(f"{name} must be a non-empty string of at most {MAX_NAME_CHARS} printable characters, got {_show(value)}")
        shape = self.input_shape
        if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(v) and v > 0 for v in shape)):
            raise bad(f"input_shape must be [C, H, W] positive ints, got {_show(shape)}")
        channels, height, width = shape
        if max(height, width) > MAX_INPUT_SIDE or channels * height * width > MAX_INPUT_VALUES:
            raise bad(f"input_shape {shape} exceeds the bounds (H, W <= {MAX_INPUT_SIDE}, C*H*W <= {MAX_INPUT_VALUES})")
        if self.input_dtype not in INPUT_DTYPES:
            raise bad(f"input_dtype {self.input_dtype!r} not in {INPUT_DTYPES}")
        if self.input_layout not in INPUT_LAYOUTS:
            raise bad(f"input_layout {self.input_layout!r} not in {INPUT_LAYOUTS}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not (isinstance(values, list) and len(values) == channels and all(_is_real(v) for v in values)):
                raise bad(f"{name} must be {channels} finite numbers (one per channel), got {_show(values)}")
        if any(s <= 0 for s in self.std):
            raise bad(f"std must be positive, got {self.std}")
        if not _is_int(self.block_size) or not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise bad(f"block_size must be an int in 1..{MAX_BLOCK_SIZE}, got {_show(self.block_size)}")
        if not _is_real(self.mask_threshold) or not 0.0 <= self.mask_threshold <= 1.0:
            raise bad(f"mask_threshold must be a number in [0, 1], got {_show(self.mask_threshold)}")
        if self.explain not in EXPLAIN:
            raise bad(f"explain {self.explain!r} not in {EXPLAIN}")
        if not isinstance(self.resize_policy, str) or self.resize_policy not in RESIZE_POLICIES:
            raise bad(f"resize_policy {_show(self.resize_policy)} not in {RESIZE_POLICIES}")
        if not _is_real(self.crop_fraction) or not 0.0 < self.crop_fraction <= 1.0:
            raise bad(f"crop_fraction must be a number in (0, 1], got {_show(self.crop_fraction)}")
        if self.crop_fraction != 1.0 and self.resize_policy != "center-crop":
            raise bad(f"crop_fraction {self.crop_fraction} applies to the center-crop policy only, not {self.resize_policy!r}")
        if self.classify_on not in EXPLAIN_CLASSIFY_ON[self.explain]:
            raise bad(f"classify_on {self.classify_on!r} not in {EXPLAIN_CLASSIFY_ON[self.explain]} (explain {self.explain!r})")
        full = explain_outputs(self.explain)
        if self.output_names not in (full, explain_outputs(self.explain, optional=False)):
            raise bad(f"output_names {_show(self.output_names)} are not {full} (explain {self.explain!r}; "
                      f"{', '.join(OPTIONAL_OUTPUTS)} may be left out)")
        if self.target not in TARGETS:
            raise bad(f"target {self.target!r} not in {TARGETS}")
        names = self.class_names
        if not (isinstance(names, list) and 1 <= len(names) <= MAX_CLASSES
                and all(isinstance(n, str) and len(n) <= MAX_NAME_CHARS for n in names)):
            raise bad(f"class_names must be a list of 1..{MAX_CLASSES} strings, got {_show(names)}")
        unprintable = next((i for i, n in enumerate(names) if not n.isprintable()), None)
        if unprintable is not None:  # shown on terminals, videos and reports: no newlines or escape sequences
            raise bad(f"class_names[{unprintable}] holds control characters: {_show(names[unprintable])}")
        if not _is_int(self.opset) or not 1 <= self.opset <= 1000:
            raise bad(f"opset must be an int in 1..1000, got {_show(self.opset)}")
        for name in ("dynamic_size", "function_bodies"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"{name} must be true or false, got {_show(getattr(self, name))}")
        ops = self.custom_ops
        if not (isinstance(ops, list) and all(isinstance(op, str) for op in ops)):
            raise bad(f"custom_ops must be a list of op names, got {_show(ops)}")
        unknown = sorted(set(ops) - set(CUSTOM_OPS))
        if unknown:
            raise bad(f"custom_ops {unknown} are not ops of this keepbits (known: {', '.join(CUSTOM_OPS)})")
        if not isinstance(self.provenance, dict):
            raise bad(f"provenance must be a JSON object, got {_show(self.provenance)}")
        if not isinstance(self.files, dict) or len(self.files) > MAX_FILES:
            raise bad(f"files must be a JSON object of at most {MAX_FILES} path: sha256 entries, got {_show(self.files)}")
        _safe_relpath(self.model_file, where)
        for name, digest in self.files.items():
            _safe_relpath(name, where)
            if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
                raise bad(f"files[{name!r}] is not a sha256 hex digest")
        folders = {str(parent) for name in self.files for parent in PurePosixPath(name).parents}
        clash = sorted(folders & set(self.files))
        if clash:
            raise bad(f"files: {clash[0]!r} is listed as a file and is also the folder of another listed file")
        if self.model_file not in self.files:
            raise bad(f"model file {self.model_file!r} is not listed in files")

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        for name, default in (("explain", "mask"), ("resize_policy", "letterbox"), ("crop_fraction", 1.0)):
            if data[name] == default:
                del data[name]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest") -> "Manifest":
        """Build from parsed JSON; unknown keys are an error (a newer writer), missing required keys too."""
        if not isinstance(data, Mapping):
            raise BundleError(f"{where}: not a JSON object")
        if data.get("format") != FORMAT:
            raise BundleError(f"{where}: not a keepbits bundle manifest (format={data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise BundleError(f"{where}: bundle format version {data.get('format_version')} is not supported (this keepbits reads {FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleError(f"{where}: unknown manifest fields {unknown}")
        try:
            manifest = cls(**dict(data))
        except TypeError as exc:
            raise BundleError(f"{where}: {exc}") from None
        manifest.validate(where)
        return manifest


@dataclass
class Bundle:
    """A loaded, verified bundle. ``root`` is the folder (an unpacked copy for archives)."""

    root: Path
    manifest: Manifest
    #: sha256 hex of ``manifest.json``: identifies the whole bundle (it lists every file's hash).
    digest: str
    source: Path

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model_file

    def path(self, name: str) -> Path:
        """Path of the listed file ``name``; :class:`BundleError` if it is not in the manifest."""
        if name not in self.manifest.files:
            raise BundleError(f"{self.source}: {name!r} is not a file of this bundle")
        return self.root / name

    def close(self) -> None:
        """Remove the unpacked copy of an archive bundle now (it is also removed when the
        bundle is garbage-collected, and at exit); a no-op for folder bundles."""
        if self._cleanup is not None:
            self._cleanup()

    #: Removes the private temp folder of an unpacked archive (set by :func:`load_bundle`).
    _cleanup: Any = field(default=None, init=False, repr=False, compare=False)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _safe_relpath(name: str, where: str) -> PurePosixPath:
    """A normalised relative POSIX path inside the bundle, or :class:`BundleError`."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise BundleError(f"{where}: bad file name {name!r}")
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "." in p.parts or str(p) != name or name == MANIFEST_NAME:
        raise BundleError(f"{where}: file {name!r} is outside the bundle or not a normalised relative path")
    return p


def _check_inside(root: Path, name: str, where: str) -> Path:
    """``root/name`` if it is a regular file whose every component is inside ``root`` and no symlink."""
    current = root
    for part in PurePosixPath(name).parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            raise BundleError(f"{where}: listed file {name!r} is missing") from None
        except OSError as exc:  # e.g. a parent that is a file: NotADirectoryError
            raise BundleError(f"{where}: listed file {name!r} cannot be read ({exc.strerror})") from None
        if stat.S_ISLNK(mode):
            raise BundleError(f"{where}: {name!r} is a symlink; bundles hold regular files only")
    if not stat.S_ISREG(mode):
        raise BundleError(f"{where}: {name!r} is not a regular file")
    resolved = current.resolve()
    if root.resolve() not in resolved.parents:
        raise BundleError(f"{where}: {name!r} resolves outside the bundle")
    return current


def _check_external_data(model_path: Path, files: Mapping[str, str], where: str) -> None:
    """Refuse ONNX tensors stored in external files that the manifest does not list."""
    try:
        import onnx
    except ImportError:  # onnx is a dependency; without it ORT still refuses paths outside the model folder
        return
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure means a broken bundle
        raise BundleError(f"{where}: {model_path.name} is not a readable ONNX model ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    tensors = []
    pending = [(model.graph.initializer, model.graph.node)] + [((), f.node) for f in model.functions]
    while pending:
        initializers, nodes = pending.pop()
        tensors.extend(initializers)
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensors.append(attr.t)
                tensors.extend(attr.tensors)
                subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
                pending.extend((g.initializer, g.node) for g in subgraphs)
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            _safe_relpath(location, where)
            if location not in files:
                raise BundleError(f"{where}: tensor {tensor.name!r} reads external data {location!r}, which is not a listed bundle file")


def _read_manifest(raw: bytes, where: str) -> Manifest:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: bad JSON, or an int of more digits than Python parses
        raise BundleError(f"{where}: manifest.json is not valid JSON ({exc})") from None
    except RecursionError:
        raise BundleError(f"{where}: manifest.json nests too deeply") from None
    return Manifest.from_dict(data, where)


def _member_chunks(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> Iterator[bytes]:
    """The bytes of archive member ``info`` in chunks, never more than its header declares;
    every fault of the archive (CRC, sizes, encryption, compression method) as :class:`BundleError`."""
    if stat.S_ISLNK(info.external_attr >> 16):
        raise BundleError(f"{where}: archive member {info.filename!r} is a symlink")
    got = 0
    try:
        with zf.open(info) as src:
            while chunk := src.read(1 << 20):
                got += len(chunk)
                if got > info.file_size:
                    raise BundleError(f"{where}: archive member {info.filename!r} holds more than the {info.file_size} bytes its header declares")
                yield chunk
    except BundleError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile, zlib, bz2 and lzma raise many types on corrupt members
        raise BundleError(f"{where}: archive member {info.filename!r} cannot be read ({type(exc).__name__}: {exc})") from None
    if got != info.file_size:
        raise BundleError(f"{where}: archive member {info.filename!r} holds {got} bytes, its header declares {info.file_size}")


def _unpack_listed(zf: zipfile.ZipFile, members: Mapping[str, zipfile.ZipInfo], raw: bytes, manifest: Manifest, where: str) -> Path:
    """Unpack the manifest (``raw``) and exactly the files it lists into a private temp folder,
    checking each file's size and sha256 while it streams; unlisted members are never read."""
    missing = [name for name in manifest.files if name not in members]
    if missing:
        raise BundleError(f"{where}: listed file {missing[0]!r} is not in the archive")
    infos = [members[name] for name in manifest.files]
    total = sum(info.file_size for info in infos)
    packed = sum(info.compress_size for info in infos)
    sizes = [(f"archive member {i.filename!r}", i.file_size, i.compress_size, 1 << 16) for i in infos] + [("the listed files", total, packed, 1 << 20)]
    for name, size, compressed, checked_from in sizes:
        if size > checked_from and size > MAX_COMPRESSION_RATIO * max(compressed, 1):
            raise BundleError(f"{where}: {name} would unpack to {size} bytes from {compressed} compressed "
                              f"(more than {MAX_COMPRESSION_RATIO}× as many: not model files)")
    if total > MAX_ARCHIVE_BYTES:
        raise BundleError(f"{where}: the listed files unpack to {total} bytes, more than {MAX_ARCHIVE_BYTES >> 30} GiB")
    dest = Path(tempfile.mkdtemp(prefix="keepbits-bundle-"))
    try:
        free = shutil.disk_usage(dest).free
        if total > free:
            raise BundleError(f"{where}: the listed files unpack to {total} bytes, the temp folder {dest.parent} has {free} free")
        try:
            (dest / MANIFEST_NAME).write_bytes(raw)
        except OSError as exc:
            raise BundleError(f"{where}: cannot unpack {MANIFEST_NAME} ({exc})") from None
        for info in infos:
            target = dest.joinpath(*PurePosixPath(info.filename).parts)
            h = hashlib.sha256()
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "xb") as out:
                    for chunk in _member_chunks(zf, info, where):
                        h.update(chunk)
                        out.write(chunk)
            except OSError as exc:
                raise BundleError(f"{where}: cannot unpack {info.filename!r} ({exc})") from None
            _check_digest(info.filename, h.hexdigest(), manifest.files[info.filename], where)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _check_digest(name: str, got: str, want: str, where: str) -> None:
    if got != want:
        raise BundleError(f"{where}: {name} was modified (sha256 {got[:12]}…, manifest says {want[:12]}…)")


def _manifest_bytes(size: int, where: str) -> None:
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{where}: manifest.json has {size} bytes (at most {MAX_MANIFEST_BYTES})")


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` looks like a bundle (a folder or ``.zip`` with a manifest at its top),
    unverified: for telling users which kind of file they gave.

    Example:
        >>> is_bundle("/nonexistent")
        False
    """
    path = Path(path)
    if path.is_dir():
        return (path / MANIFEST_NAME).is_file()
    try:
        with zipfile.ZipFile(path) as zf:
            return MANIFEST_NAME in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def load_bundle(path: str | Path, expected_digest: str | None = None) -> Bundle:
    """Open and verify a bundle folder or ``.zip``; :class:`BundleError` on any problem.

    ``expected_digest`` pins the bundle: the sha256 of its ``manifest.json`` must match.
    An archive's listed files are unpacked into a private temp folder, removed by
    :meth:`Bundle.close` (or when the bundle is garbage-collected, or at exit).

    Example:
        >>> from keepbits.bundle import load_bundle
        >>> load_bundle("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        keepbits.errors.BundleError: bundle not found: /nonexistent
    """
    source = Path(path)
    if not source.exists():
        raise BundleError(f"bundle not found: {source}")
    where = str(source)
    if source.is_file() and source.suffix.lower() == ".onnx" and not zipfile.is_zipfile(source):  # by content, not name
        raise BundleError(f"{where}: an ONNX model, not a keepbits bundle (a .zip or folder with manifest.json): make one "
                          f"with: keepbits train nice --classifier {source} ..., then keepbits export onnx")

    def verified(raw: bytes) -> tuple[str, Manifest]:
        digest = hashlib.sha256(raw).hexdigest()
        if expected_digest is not None and not (isinstance(expected_digest, str) and len(expected_digest) == 64
                                                and all(ch in "0123456789abcdefABCDEF" for ch in expected_digest)):
            raise BundleError(f"expected_digest must be 64 hex digits (a sha256), got {expected_digest!r}")
        if expected_digest is not None and digest != expected_digest.lower():
            raise BundleError(f"{where}: bundle digest {digest} does not match the expected {expected_digest}")
        return digest, _read_manifest(raw, where)

    if source.is_dir():
        manifest_path = source / MANIFEST_NAME
        if manifest_path.is_symlink() or not manifest_path.is_file():
            raise BundleError(f"{where}: no manifest.json (is this a keepbits bundle?)")
        try:
            _manifest_bytes(manifest_path.stat().st_size, where)
            digest, manifest = verified(manifest_path.read_bytes())
            for name, want in manifest.files.items():
                _check_digest(name, sha256_file(_check_inside(source, name, where)), want, where)
        except OSError as exc:
            raise BundleError(f"{where}: cannot read the bundle ({exc})") from None
        root = source
    elif source.is_file():
        try:
            zf = zipfile.ZipFile(source)
        except Exception as exc:  # noqa: BLE001 - zipfile raises many types on a file that is no zip
            raise BundleError(f"{where}: not a readable bundle archive ({type(exc).__name__}: {exc})") from None
        with zf:
            members: dict[str, zipfile.ZipInfo] = {}
            for info in zf.infolist():
                if info.filename in members:
                    raise BundleError(f"{where}: archive member {info.filename!r} appears twice")
                members[info.filename] = info
            if MANIFEST_NAME not in members:
                if any(name.endswith("/data.pkl") for name in members):  # torch.save's archive layout
                    raise BundleError(f"{where}: a torch checkpoint, not a model bundle: a NICE or SimpleBits checkpoint "
                                      f"becomes one with keepbits export onnx --model {where} --out bundle.zip")
                raise BundleError(f"{where}: no manifest.json (is this a keepbits bundle?)")
            _manifest_bytes(members[MANIFEST_NAME].file_size, where)
            raw = b"".join(_member_chunks(zf, members[MANIFEST_NAME], where))
            digest, manifest = verified(raw)
            root = _unpack_listed(zf, members, raw, manifest, where)
    else:
        raise BundleError(f"{where}: not a bundle folder or .zip file")
    bundle = Bundle(root=root, manifest=manifest, digest=digest, source=source)
    if root is not source:
        bundle._cleanup = weakref.finalize(bundle, shutil.rmtree, root, True)
    try:
        _check_external_data(root / manifest.model_file, manifest.files, where)
    except BaseException:
        bundle.close()
        raise
    return bundle


def check_graph_io(manifest: Manifest, inputs: Sequence[Any], outputs: Sequence[Any], where: str = "bundle") -> None:
    """Refuse a graph whose inputs and outputs disagree with ``manifest``: names, dtypes, ranks
    and every static dimension (symbolic or missing dimensions pass).

    ``inputs``/``outputs`` describe the graph as ONNX Runtime's ``InferenceSession.get_inputs()``
    / ``get_outputs()`` do: objects with ``name``, ``type`` (``"tensor(float)"``) and ``shape``
    (ints, or str/None where dynamic). Expected: one input ``input_name`` of ``input_dtype``,
    N×H×W×C (NHWC) or N×C×H×W (NCHW), dynamic N; ``logits`` N×K float with K the number of
    classes; ``mask`` N×1×H×W float; ``mixed``/``simplified`` float in the input's layout.

    Example:
        >>> from types import SimpleNamespace as arg
        >>> from keepbits.bundle import Manifest, check_graph_io
        >>> m = Manifest(input_shape=[3, 8, 8], input_dtype="uint8", input_layout="NHWC", mean=[0.5] * 3,
        ...              std=[0.5] * 3, class_names=["a", "b"], block_size=2, mask_threshold=0.5,
        ...              generator="g", classifier="c", output_names=["logits", "mask"])
        >>> image = arg(name="image", type="tensor(uint8)", shape=["N", "H", "W", 3])
        >>> check_graph_io(m, [image], [arg(name="logits", type="tensor(float)", shape=["N", 2]),
        ...                             arg(name="mask", type="tensor(float)", shape=["N", 1, "H", "W"])])
        >>> check_graph_io(m, [image], [arg(name="logits", type="tensor(float)", shape=["N", 10]),
        ...                             arg(name="mask", type="tensor(float)", shape=["N", 1, "H", "W"])])
        Traceback (most recent call last):
        keepbits.errors.BundleError: bundle: graph output 'logits' has 10 at dimension 1, the manifest implies 2 (class_names)
    """
    m = manifest
    c, h, w = m.input_shape
    image = ["batch", "H", "W", "C"] if m.input_layout == "NHWC" else ["batch", "C", "H", "W"]
    sizes = {"H": h, "W": w, "C": c, "1": 1, "K": len(m.class_names)}
    layout = "input_shape, input_layout"
    fields = {"H": layout, "W": layout, "C": layout, "1": "the mask's one channel", "K": "class_names"}
    expected = {"logits": ["batch", "K"], "mask": ["batch", "1", "H", "W"], "mixed": image, "simplified": image}

    def check(kind: str, arg: Any, dims: list[str], dtype: str) -> None:
        if arg.type != dtype:
            raise BundleError(f"{where}: graph {kind} {arg.name!r} is {arg.type}, the manifest implies {dtype} "
                              f"({'input_dtype' if kind == 'input' else 'outputs are float32'})")
        shape = list(arg.shape) if arg.shape is not None else None
        if shape is None:
            return
        if len(shape) != len(dims):
            raise BundleError(f"{where}: graph {kind} {arg.name!r} has rank {len(shape)} {shape}, the manifest implies "
                              f"{'x'.join(dims)} ({'input_layout' if kind == 'input' else 'output_names'})")
        for axis, (dim, role) in enumerate(zip(shape, dims)):
            if not _is_int(dim):
                continue
            if role == "batch":
                raise BundleError(f"{where}: graph {kind} {arg.name!r} fixes the batch to {dim}; the runtime needs it dynamic")
            if dim != sizes[role]:
                raise BundleError(f"{where}: graph {kind} {arg.name!r} has {dim} at dimension {axis}, the manifest "
                                  f"implies {sizes[role]} ({fields[role]})")

    names = [a.name for a in inputs]
    if names != [m.input_name]:
        raise BundleError(f"{where}: graph inputs are {names}, the manifest's input_name is {m.input_name!r} (one input)")
    check("input", inputs[0], image, ORT_TYPES[m.input_dtype])
    by_name = {a.name: a for a in outputs}
    for name in m.output_names:
        if name not in by_name:
            raise BundleError(f"{where}: the graph has no output {name!r} (graph outputs: {sorted(by_name)}; output_names)")
        check("output", by_name[name], expected[name], "tensor(float)")


def _replaceable(path: Path) -> str | None:
    """Why ``path`` may not be replaced by a new bundle, or None: only a keepbits bundle is (a
    folder holding nothing but its manifest and the files it lists, or a zip with a keepbits
    manifest), never another file or folder (a checkpoint's run folder, a user's data)."""
    if path.is_symlink():
        return "is a symbolic link"
    try:
        if path.is_dir():
            raw = (path / MANIFEST_NAME).read_bytes()[:MAX_MANIFEST_BYTES + 1]
            members = [p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir()]
        else:
            with zipfile.ZipFile(path) as zf:
                info = zf.getinfo(MANIFEST_NAME)
                _manifest_bytes(info.file_size, str(path))
                raw = zf.read(info)
                members = [name for name in zf.namelist() if not name.endswith("/")]
        _manifest_bytes(len(raw), str(path))
        listed = _read_manifest(raw, str(path)).files
    except (OSError, KeyError, zipfile.BadZipFile, BundleError):
        return "is not a keepbits bundle"
    others = sorted(set(members) - {MANIFEST_NAME, *listed})
    if others:  # a user's notes added to a bundle folder or archive are theirs
        return f"holds files that are not the bundle's ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
    return None


def refuse_existing(out: str | Path, overwrite: bool = False) -> None:
    """Check, before any work, that a bundle can be written at ``out``: :class:`BundleError`
    when something is there already (with ``overwrite``: when it is not a keepbits bundle, which
    alone is replaced) or when its folder cannot be created or written."""
    out = Path(out)
    empty_folder = out.is_dir() and not out.is_symlink() and not any(out.iterdir())  # nothing to lose: written into
    if (out.exists() or out.is_symlink()) and not empty_folder:
        if not overwrite:
            raise BundleError(f"{out} exists; replace it with --force (Python: overwrite=True)")
        why = _replaceable(out)
        if why is not None:
            raise BundleError(f"{out} {why}: --force replaces a keepbits bundle only, never another file or folder")
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    if not existing.is_dir():
        raise BundleError(f"cannot write bundle {out}: {existing} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = sibling_temp(out)
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise BundleError(f"cannot write bundle {out} ({exc.strerror or exc})") from None


def write_bundle(
    out: str | Path,
    manifest: Manifest,
    files: Mapping[str, bytes | str | Path],
    archive: bool | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``files`` (name -> bytes or source path) and the manifest with their sha256.

    ``archive`` (default: ``out`` ends in ``.zip``) writes one zip file instead of a folder.
    The bundle appears atomically (temp name in the same folder, then rename). Returns ``out``.
    """
    out = Path(out)
    archive = out.suffix.lower() == ".zip" if archive is None else archive
    refuse_existing(out, overwrite)
    if manifest.model_file not in files:
        raise BundleError(f"bundle files lack the model file {manifest.model_file!r}")
    staging = sibling_temp(out)  # not mkdtemp: a folder bundle gets the umask's permissions, not 0700
    staging.mkdir()
    try:
        digests = {}
        for name, content in files.items():
            rel = _safe_relpath(name, "write_bundle")
            target = staging.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                shutil.copyfile(content, target)
            digests[name] = sha256_file(target)
        final = dataclasses.replace(manifest, files=dict(sorted(digests.items())))
        final.validate("write_bundle")
        (staging / MANIFEST_NAME).write_text(final.to_json())
        if archive:
            tmp_zip = staging.with_suffix(".zip")
            with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as zf:
                zf.write(staging / MANIFEST_NAME, MANIFEST_NAME)
                for name in final.files:
                    zf.write(staging.joinpath(*PurePosixPath(name).parts), name)
            _replace(tmp_zip, out)
        else:
            _replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _replace(src: Path, dst: Path) -> None:
    if dst.is_dir() and not dst.is_symlink():
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        dst.unlink()
    os.replace(src, dst)


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CUSTOM_DOMAIN",
    "EXPLAIN",
    "Manifest",
    "Bundle",
    "is_bundle",
    "load_bundle",
    "refuse_existing",
    "write_bundle",
    "sha256_file",
    "explain_outputs",
    "check_graph_io",
]
