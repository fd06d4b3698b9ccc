"""Helpers shared by CLI commands: the help formatter, old option names kept for one release,
argparse types of bounded numbers, paths that must exist, output folders, the command line for
provenance records, the options that name a classifier brought by its user (spec, weights,
kwargs, preprocessing) and ``--device``."""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from keepbits.errors import InputError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default after its help text, except for flags, for a
    default of None and where the help text already says what the default means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0 or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Deprecated(argparse.Action):
    """A hidden old spelling of ``replacement``: stores into its destination, says so on stderr."""

    def __init__(self, option_strings: list[str], dest: str, replacement: argparse.Action, **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        old = option_string or f"positional {self.dest.upper()}"
        print(f"keepbits: {old} is deprecated; use {self.replacement.option_strings[-1]}", file=sys.stderr)
        setattr(namespace, self.replacement.dest, values)
        self.replacement.required = False  # given under its old name: satisfied for this parse


def add_argument(parser: argparse.ArgumentParser, *names: str, deprecated: Sequence[str] = (), **kwargs: Any) -> argparse.Action:
    """``parser.add_argument(*names, **kwargs)`` that also accepts the old spellings ``deprecated``
    for one release: hidden from ``--help``, each use prints one line
    ``keepbits: OLD is deprecated; use NEW`` on stderr. An old name without a leading ``-`` was a
    positional argument.

    Example:
        >>> import argparse, contextlib, io
        >>> p = argparse.ArgumentParser()
        >>> _ = add_argument(p, "--model", required=True, deprecated=["--checkpoint"], help="model")
        >>> with contextlib.redirect_stderr(io.StringIO()) as err:
        ...     args = p.parse_args(["--checkpoint", "m.pt"])
        >>> args.model, err.getvalue()
        ('m.pt', 'keepbits: --checkpoint is deprecated; use --model\\n')
    """
    new = parser.add_argument(*names, **kwargs)
    same = {k: getattr(new, k) for k in ("type", "choices", "metavar")}
    for old in deprecated:
        if old.startswith("-"):
            parser.add_argument(old, action=_Deprecated, replacement=new, nargs=new.nargs, dest="_deprecated_" + old.lstrip("-").replace("-", "_"),
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS, **same)
        else:  # one optional positional; absent, it keeps SUPPRESS and stores nothing
            parser.add_argument(old, action=_Deprecated, replacement=new, nargs="?" if new.nargs is None else "*",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS, **same)
    return new


def number(kind: type[int] | type[float], *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind`` (int or float) parsed from the text, finite, ``>= minimum``,
    ``> above`` and ``<= maximum`` where given; otherwise :class:`argparse.ArgumentTypeError`
    saying what is allowed (the CLI prints it as one line naming the option, exit 2).

    Example:
        >>> fps = number(float, above=0, maximum=1000)
        >>> fps("25")
        25.0
        >>> fps("inf")
        Traceback (most recent call last):
        argparse.ArgumentTypeError: must be a number > 0 and <= 1000, got 'inf'
    """
    noun = "an integer" if kind is int else "a number"
    bounds = [f">= {minimum:g}" if minimum is not None else "", f"> {above:g}" if above is not None else "",
              f"<= {maximum:g}" if maximum is not None else ""]
    allowed = f"{noun} {' and '.join(b for b in bounds if b)}".strip()

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if (not math.isfinite(value) or (minimum is not None and value < minimum) or (above is not None and value <= above)
                or (maximum is not None and value > maximum)):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    return parse


#: argparse types of the common ranges (:func:`number`).
positive_int = number(int, minimum=1)
non_negative_int = number(int, minimum=0)
non_negative_float = number(float, minimum=0)
#: A learning rate: finite and > 0 (NaN would train to NaN weights and exit 0).
POSITIVE_LR = number(float, above=0)
#: A seed numpy and torch both take (a negative one was numpy's traceback).
SEED = number(int, minimum=0, maximum=2**32 - 1)
#: A confidence threshold τ of SIS: in (0, 1].
THRESHOLD = number(float, above=0, maximum=1)


def add_fps_option(p: argparse.ArgumentParser) -> None:
    """``--fps`` of the commands that write a video of decoded frames (``decode``, ``receive``)."""
    from keepbits.runtime.video import MAX_FPS

    p.add_argument("--fps", type=number(float, above=0, maximum=MAX_FPS), default=25.0, help="frame rate of --video")


def output_folder(value: str | Path, flag: str = "--out", writes: Sequence[str] = ()) -> Path:
    """``value`` as a folder the command can write into, checked before any work and not made
    yet: an existing folder, or a new one under a writable folder; :class:`InputError` naming
    ``flag`` for a file there (or in its way), a place this process cannot write, or a folder that
    holds one of the files the command ``writes`` (an earlier run's: never overwritten)."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: exists and is not a folder")
    earlier = [name for name in writes if (path / name).exists()]
    if earlier:
        raise InputError(f"{flag} {path}: holds an earlier run's {', '.join(earlier)}; choose another folder or remove them")
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: cannot write there (permission denied in {parent})")
    return path


def existing_path(value: str | Path, what: str = "path") -> Path:
    path = Path(value)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    return path


def command_line() -> str:
    """The command as typed, for provenance records."""
    return shlex.join(["keepbits", *sys.argv[1:]])


#: What a classifier SPEC may be (help text of --classifier / --model).
CLASSIFIER_SPEC_HELP = ("a keepbits checkpoint (.pt), a registry name (e.g. efficientnet_lite0, pretrained when it can be), "
                        "package.module:factory (imported and called; weights from --classifier-weights) or an .onnx file "
                        "(converted with onnx2torch: pip install 'keepbits[onnx2torch]')")


def add_classifier_options(p: argparse.ArgumentParser) -> None:
    """``--classifier-weights``, ``--classifier-kwargs`` and the preprocessing overrides of a
    classifier SPEC (``--image-size``, ``--mean``, ``--std``, ``--resize-policy``,
    ``--crop-fraction``, ``--class-names``)."""
    from keepbits.data import RESIZE_POLICIES

    p.add_argument("--classifier-weights", default=None, help="state dict file for a registry name or package.module:factory "
                   "(read with torch.load(weights_only=True); default: pretrained=True where the builder takes it)")
    p.add_argument("--classifier-kwargs", default="{}", help="JSON keyword arguments of the registry builder or factory")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="classifier input size (default: what the classifier records or declares)")
    p.add_argument("--mean", type=float, nargs="+", default=None, help="per-channel mean on the 0..1 scale (default: recorded)")
    p.add_argument("--std", type=float, nargs="+", default=None, help="per-channel std on the 0..1 scale (default: recorded)")
    p.add_argument("--resize-policy", choices=RESIZE_POLICIES, default=None,
                   help="how frames reach the input size: stretch, crop the middle, pad black (default: recorded)")
    p.add_argument("--crop-fraction", type=float, default=None,
                   help="center-crop: share of the scaled short side kept (ImageNet: 0.875; default: recorded)")
    p.add_argument("--class-names", default=None, help="JSON list or text file (one name a line) of the classifier's classes, "
                   "or 'imagenet' for the 1,000 ImageNet names (default: recorded, else 0..K-1)")


def json_object(text: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{flag} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InputError(f"{flag} must be a JSON object")
    return value


def _class_names(value: str) -> tuple[str, ...]:
    if value == "imagenet":
        from keepbits.data import imagenet_class_names

        return tuple(imagenet_class_names())
    # an inline JSON list ('["cat", "dog"]', as the help says), else a file: JSON or one name a line
    text = value if value.lstrip().startswith("[") else existing_path(value, "--class-names file").read_text(encoding="utf-8")
    try:
        names = json.loads(text)
    except json.JSONDecodeError:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
        raise InputError(f"--class-names {value}: expected a JSON list of strings or one name a line")
    return tuple(names)


def classifier_options(args: argparse.Namespace) -> dict[str, Any]:
    """``weights``, ``kwargs`` and ``preprocessing`` overrides for
    :func:`keepbits.training.byo.resolve_classifier` from :func:`add_classifier_options`' flags."""
    if args.classifier_weights is not None:
        existing_path(args.classifier_weights, "--classifier-weights file")
    overrides = {"input_size": tuple(args.image_size) if args.image_size else None,
                 "mean": tuple(args.mean) if args.mean else None, "std": tuple(args.std) if args.std else None,
                 "resize_policy": args.resize_policy, "crop_fraction": args.crop_fraction,
                 "class_names": _class_names(args.class_names) if args.class_names else None}
    return {"weights": args.classifier_weights, "kwargs": json_object(args.classifier_kwargs, "--classifier-kwargs"),
            "preprocessing": {k: v for k, v in overrides.items() if v is not None}}


def add_user_images_options(p: argparse.ArgumentParser) -> None:
    """``--data`` and ``--frame-step`` of the commands that run a bundle on the user's images
    (:func:`keepbits.data.images.load_images`: eval, compare, explain)."""
    p.add_argument("--data", required=True,
                   help="a labelled data set (.npz, idx, train/test split, class folders), your footage (a folder of "
                        "images at any nesting, videos; unreadable files are skipped and counted), a video or one image")
    add_frame_step_option(p)


def add_force_option(p: argparse.ArgumentParser) -> None:
    """``--force`` of every trainer: replace an earlier run's checkpoints at ``--out``
    (:func:`keepbits.training.checkpoint.refuse_earlier_run`)."""
    p.add_argument("--force", action="store_true", help="replace the checkpoints an earlier run left at --out (default: refuse them)")


def add_frame_step_option(p: argparse.ArgumentParser) -> None:
    """``--frame-step K`` of every command that reads footage: every K-th video frame."""
    p.add_argument("--frame-step", type=int, default=1, help="videos: every k-th frame")


def add_precision_option(p: argparse.ArgumentParser) -> None:
    """``--precision auto|fp32|bf16`` of the trainers whose forward passes may run in bf16."""
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast of the forward passes on CUDA, float32 on the CPU (losses always float32)")


def add_threads_option(p: argparse.ArgumentParser, engine: str = "torch") -> None:
    """``--threads N`` (an integer >= 1, else a usage error): torch's CPU threads (``engine="torch"``:
    trainers, audits) or ONNX Runtime's intra-op threads (``"onnxruntime"``: the commands that run a bundle)."""
    what = {"torch": "torch CPU threads (default: torch's choice)",
            "onnxruntime": "ONNX Runtime intra-op threads (default: ORT's choice)"}[engine]
    p.add_argument("--threads", type=positive_int, default=None, help=what)


def add_device_option(p: argparse.ArgumentParser) -> None:
    """``--device auto|cpu|cuda`` of the trainers and gradient audits."""
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where torch runs: auto takes CUDA when torch sees a GPU")
