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

import atexit
import dataclasses
import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from keepbits.data.preprocess import RESIZE_POLICIES
from keepbits.errors import BundleError

FORMAT = "keepbits-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
#: Custom-op domain of the NICE nodes (``HardConcreteMask``, ``MixedResCompose``, ``MaskCompose``).
CUSTOM_DOMAIN = "keepbits"
#: Largest archive we unpack (sum of member sizes), against zip bombs.
MAX_ARCHIVE_BYTES = 8 << 30

INPUT_DTYPES = ("uint8", "float32")
INPUT_LAYOUTS = ("NHWC", "NCHW")
CLASSIFY_ON = ("original", "mixed", "simplified")
TARGETS = ("onnxruntime", "tensorrt")
#: Explain stages: NICE's mask + mixed-resolution image, or the SimpleBits simplifier.
EXPLAIN = ("mask", "simplify")
#: Graph outputs and the ``classify_on`` values each explain stage allows.
EXPLAIN_OUTPUTS = {"mask": ["logits", "mask", "mixed"], "simplify": ["logits", "simplified"]}
#: Outputs a bundle may leave out: x̃, which the runtime never reads (its codec rebuilds x̃ from the hard mask).
OPTIONAL_OUTPUTS = ("mixed",)
EXPLAIN_CLASSIFY_ON = {"mask": ("original", "mixed"), "simplify": ("simplified",)}


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
    opset: int = 18
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
        """Raise :class:`BundleError` naming ``where`` and the first bad field."""
        def bad(msg: str) -> BundleError:
            return BundleError(f"{where}: {msg}")

        if self.format != FORMAT:
            raise bad(f"format is {self.format!r}, not {FORMAT!r}")
        if self.format_version != FORMAT_VERSION:
            raise bad(f"bundle format version {self.format_version} is not supported (this keepbits reads {FORMAT_VERSION})")
        if len(self.input_shape) != 3 or not all(isinstance(v, int) and v > 0 for v in self.input_shape):
            raise bad(f"input_shape must be [C, H, W] positive ints, got {self.input_shape}")
        if self.input_dtype not in INPUT_DTYPES:
            raise bad(f"input_dtype {self.input_dtype!r} not in {INPUT_DTYPES}")
        if self.input_layout not in INPUT_LAYOUTS:
            raise bad(f"input_layout {self.input_layout!r} not in {INPUT_LAYOUTS}")
        channels = self.input_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise bad(f"mean/std need {channels} values (one per channel), got {len(self.mean)}/{len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise bad(f"std must be positive, got {self.std}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise bad(f"block_size must be an int >= 1, got {self.block_size!r}")
        if not 0.0 <= float(self.mask_threshold) <= 1.0:
            raise bad(f"mask_threshold must be in [0, 1], got {self.mask_threshold}")
        if self.explain not in EXPLAIN:
            raise bad(f"explain {self.explain!r} not in {EXPLAIN}")
        if self.resize_policy not in RESIZE_POLICIES:
            raise bad(f"resize_policy {self.resize_policy!r} not in {RESIZE_POLICIES}")
        if isinstance(self.crop_fraction, bool) or not isinstance(self.crop_fraction, (int, float)) or not 0.0 < self.crop_fraction <= 1.0:
            raise bad(f"crop_fraction must be a number in (0, 1], got {self.crop_fraction!r}")
        if self.crop_fraction != 1.0 and self.resize_policy != "center-crop":
            raise bad(f"crop_fraction {self.crop_fraction} applies to the center-crop policy only, not {self.resize_policy!r}")
        if self.classify_on not in EXPLAIN_CLASSIFY_ON[self.explain]:
            raise bad(f"classify_on {self.classify_on!r} not in {EXPLAIN_CLASSIFY_ON[self.explain]} (explain {self.explain!r})")
        full = explain_outputs(self.explain)
        if self.output_names not in (full, explain_outputs(self.explain, optional=False)):
            raise bad(f"output_names {self.output_names} are not {full} (explain {self.explain!r}; "
                      f"{', '.join(OPTIONAL_OUTPUTS)} may be left out)")
        if self.target not in TARGETS:
            raise bad(f"target {self.target!r} not in {TARGETS}")
        if not self.class_names:
            raise bad("class_names is empty")
        _safe_relpath(self.model_file, where)
        for name, digest in self.files.items():
            _safe_relpath(name, where)
            if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
                raise bad(f"files[{name!r}] is not a sha256 hex digest")
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
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{where}: manifest.json is not valid JSON ({exc})") from None
    return Manifest.from_dict(data, where)


def _unpack_archive(path: Path) -> Path:
    """Unpack a bundle ``.zip`` into a private temp folder (removed at exit), member by member."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"{path}: not a readable bundle archive ({exc})") from None
    with zf:
        infos = zf.infolist()
        if sum(i.file_size for i in infos) > MAX_ARCHIVE_BYTES:
            raise BundleError(f"{path}: archive unpacks to more than {MAX_ARCHIVE_BYTES >> 30} GiB")
        dest = Path(tempfile.mkdtemp(prefix="keepbits-bundle-"))
        atexit.register(shutil.rmtree, dest, True)
        for info in infos:
            if info.is_dir():
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                raise BundleError(f"{path}: archive member {info.filename!r} is a symlink")
            rel = _safe_relpath(info.filename, str(path)) if info.filename != MANIFEST_NAME else PurePosixPath(MANIFEST_NAME)
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return dest


def load_bundle(path: str | Path, expected_digest: str | None = None) -> Bundle:
    """Open and verify a bundle folder or ``.zip``; :class:`BundleError` on any problem.

    ``expected_digest`` pins the bundle: the sha256 of its ``manifest.json`` must match.

    Example:
        >>> from keepbits.bundle import load_bundle
        >>> load_bundle("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        keepbits.errors.BundleError: bundle not found: /nonexistent
    """
    source = Path(path)
    if not source.exists():
        raise BundleError(f"bundle not found: {source}")
    root = source if source.is_dir() else _unpack_archive(source)
    where = str(source)
    manifest_path = root / MANIFEST_NAME
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise BundleError(f"{where}: no manifest.json (is this a keepbits bundle?)")
    raw = manifest_path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if expected_digest is not None and digest != expected_digest.lower():
        raise BundleError(f"{where}: bundle digest {digest} does not match the expected {expected_digest}")
    manifest = _read_manifest(raw, where)
    for name, want in manifest.files.items():
        got = sha256_file(_check_inside(root, name, where))
        if got != want:
            raise BundleError(f"{where}: {name} was modified (sha256 {got[:12]}…, manifest says {want[:12]}…)")
    _check_external_data(root / manifest.model_file, manifest.files, where)
    return Bundle(root=root, manifest=manifest, digest=digest, source=source)


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
    archive = out.suffix == ".zip" if archive is None else archive
    if out.exists() and not overwrite:
        raise BundleError(f"{out} exists; pass overwrite=True (CLI: --force) to replace it")
    if manifest.model_file not in files:
        raise BundleError(f"bundle files lack the model file {manifest.model_file!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
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
    "load_bundle",
    "write_bundle",
    "sha256_file",
    "explain_outputs",
]
