"""One grammar for every command: --help exits 0 and shows defaults, --model/--data/--num-*/--out
spellings, -q/--debug before or after the command, old spellings as deprecated aliases, no
phantom commands."""
from __future__ import annotations

import argparse
import importlib
import sys

import pytest

from keepbits.cli import COMMANDS, build_parser, main
from keepbits.errors import InputError

#: (argv of the command, its module) for every command in the table
LEAVES = [([group, *([name] if name else [])], module) for group, table in COMMANDS.items()
          for name, module in ({"": table} if isinstance(table, str) else table).items()]
OLD_SPELLINGS = {"--checkpoint", "--images", "--max-images", "--max-train", "--max-test", "--train-images", "--test-images",
                 "--eval-images", "--ru-train-images", "--calibration-images"}


def _command_parser(path: list[str]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def test_every_listed_command_exists_and_nothing_else():
    for _, module in LEAVES:
        m = importlib.import_module(module)  # a phantom entry fails here
        assert m.HELP and callable(m.add_arguments) and callable(m.run), module
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["bench", "classifier"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("path", [p for p, _ in LEAVES], ids=" ".join)
def test_help_exits_0_and_shows_every_default(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "%%" not in out, f"{' '.join(path)}: an argparse escape printed as written"
    text = "".join(out.split())  # help wraps lines, at spaces and hyphens
    for action in _visible(_command_parser(path)):
        assert action.help, f"{' '.join(path)} {action.option_strings}: no help text"
        if action.default is None or action.nargs == 0 or "default" in action.help:
            continue
        shown = "(default:" + "".join(str(action.default).split()) + ")"
        assert shown in text, f"{' '.join(path)} {action.option_strings}: {shown} missing from --help"


@pytest.mark.parametrize("path", [p for p, _ in LEAVES], ids=" ".join)
def test_one_spelling_per_role(path):
    for action in _visible(_command_parser(path)):
        assert action.option_strings, f"{' '.join(path)}: positional {action.dest} (use an option: --model, --data, ...)"
        assert not OLD_SPELLINGS & set(action.option_strings), (path, action.option_strings)
        if "images" in action.dest and action.nargs != 0:  # a count of images (not a flag such as --no-images)
            assert action.option_strings[-1].startswith("--num-"), (path, action.option_strings)


@pytest.mark.parametrize("before, after", [([], []), (["-q"], []), ([], ["-q"]), (["--debug"], ["-q"]), ([], ["--debug", "--quiet"])])
def test_quiet_and_debug_before_or_after_the_command(before, after):
    args = build_parser().parse_args([*before, "run", "--model", "m.zip", "--source", "v.mp4", *after])
    given = set(before + after)
    assert args.quiet == bool(given & {"-q", "--quiet"}) and args.debug == ("--debug" in given)


def test_debug_after_the_command_shows_the_traceback(tmp_path, capsys):
    argv = ["export", "int8", "--model", str(tmp_path / "missing.zip"), "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"keepbits: error: bundle not found: {tmp_path / 'missing.zip'}\n"
    with pytest.raises(InputError, match="bundle not found"):
        main([*argv, "--debug"])


@pytest.mark.parametrize("argv, line", [
    (["bench", "nice", "--checkpoint", "{missing}", "--data", "{tmp}"], "keepbits: --checkpoint is deprecated; use --model"),
    (["export", "onnx", "{missing}", "--out", "{tmp}/bundle"], "keepbits: positional CHECKPOINT is deprecated; use --model"),
    (["export", "tensorrt", "{missing}"], "keepbits: positional BUNDLE is deprecated; use --model"),
])
def test_old_spelling_still_works_with_one_deprecation_line(argv, line, tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert main([a.format(missing=missing, tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.splitlines()
    # the value reached the new option: the command itself reports the missing file
    assert err[0] == line and len(err) == 2 and err[1].startswith("keepbits: error: ") and str(missing) in err[1]


def test_old_spellings_are_hidden_and_keep_their_meaning(capsys):
    parse = build_parser().parse_args
    assert parse(["audit", "sis", "--model", "m", "--data", "d", "--out", "o", "--images", "7"]).num_images == 7  # a count here
    assert parse(["audit", "simplify", "--model", "m", "--images", "d", "--out", "o"]).data == "d"  # a path here
    assert parse(["train", "nice", "--data", "d", "--classifier", "c", "--out", "o", "--max-train", "5"]).num_train_images == 5
    assert capsys.readouterr().err.count("is deprecated") == 3
    with pytest.raises(SystemExit):
        main(["bench", "nice", "--help"])
    assert "--checkpoint" not in capsys.readouterr().out


#: commands whose work runs in torch (trainers, gradient and exact audits): one --device option
TORCH_COMMANDS = [["train", "classifier"], ["train", "nice"], ["train", "density"], ["train", "simplebits"], ["audit", "sis"],
                  ["audit", "overinterpretation"], ["audit", "cid"], ["audit", "simplify"]]


@pytest.mark.parametrize("path", TORCH_COMMANDS, ids=" ".join)
def test_torch_commands_take_one_device_option(path):
    device = [a for a in _command_parser(path)._actions if "--device" in a.option_strings]
    assert len(device) == 1 and list(device[0].choices) == ["auto", "cpu", "cuda"] and device[0].default == "auto", path


@pytest.mark.parametrize("path", [["audit", "sis"], ["audit", "overinterpretation"], ["audit", "cid"], ["audit", "simplify"]], ids=" ".join)
def test_audits_refuse_cuda_without_a_gpu_in_one_line(path, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from keepbits import registry
    from keepbits.data import sample_mnist_path
    from keepbits.training.checkpoint import Checkpoint, ModelEntry, Normalization, save_checkpoint

    model = save_checkpoint(tmp_path / "lenet.pt", Checkpoint(
        kind="classifier", models={"classifier": ModelEntry.of("lenet5", {}, registry.build("lenet5"))}, input_shape=[1, 28, 28],
        normalization=Normalization([0.13], [0.31]), class_names=[str(i) for i in range(10)]))
    extra = {"overinterpretation": ["--arch", "lenet5", "--num-test-images", "4", "--epochs", "1"]}.get(path[1], ["--num-images", "2"])
    argv = [*path, "--model", str(model), "--data", str(sample_mnist_path()), "--out", str(tmp_path / "out"), *extra, "--device", "cuda"]
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0], err


@pytest.mark.parametrize("path", [p for p, _ in LEAVES if any("--lr" in a.option_strings for a in _visible(_command_parser(p)))],
                         ids=" ".join)
def test_learning_rates_are_finite_and_positive(path):
    """--lr nan trained NaN weights and exited 0, --lr -1 was a traceback from the optimizer: now
    refused while the command line is read, like every other bounded number."""
    lr = next(a for a in _visible(_command_parser(path)) if "--lr" in a.option_strings)
    for bad in ("nan", "inf", "0", "-1", "fast"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a number > 0"):
            lr.type(bad)
    assert lr.type("3e-4") == pytest.approx(3e-4)


def test_an_aborted_keepbits_process_skips_interpreter_finalization(monkeypatch):
    """A second signal (exit 130) leaves source / model / writer threads in native code; finalizing
    under them ended 2 of 8 double-SIGINT runs in SIGABRT (134). The process exits at once instead;
    an in-process call (argv given) just returns."""
    import keepbits.cli as cli

    exits = []
    monkeypatch.setattr(cli, "_main", lambda argv: cli.ABORTED)
    monkeypatch.setattr(cli, "_exit_without_finalization", exits.append)
    assert cli.main(["run"]) == cli.ABORTED and exits == []
    cli.main()
    assert exits == [cli.ABORTED]


def test_a_reader_that_goes_away_is_no_error(monkeypatch, capsys):
    """`keepbits info | head -1`: the pipe closes under the command; no `error: [Errno 32] Broken
    pipe` line, exit 141 as a shell reports SIGPIPE, stdout pointed at /dev/null for the last flush."""
    import os

    import keepbits.cli as cli
    import keepbits.cli.doctor as doctor

    def closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    redirected = []
    monkeypatch.setattr(doctor, "run", closed_pipe)
    monkeypatch.setattr(os, "dup2", lambda fd, to: redirected.append(to))
    monkeypatch.setattr(sys.stdout, "fileno", lambda: 1, raising=False)
    assert cli.main(["doctor"]) == cli.BROKEN_PIPE and redirected == [1]
    assert "error" not in capsys.readouterr().err


@pytest.mark.parametrize("path", [p for p, _ in LEAVES if any("--seed" in a.option_strings for a in _visible(_command_parser(p)))],
                         ids=" ".join)
def test_seeds_are_refused_where_numpy_would_raise(path):
    """--seed -1 was numpy's ValueError traceback (audit sis, audit cid, ...)."""
    seed = next(a for a in _visible(_command_parser(path)) if "--seed" in a.option_strings)
    for bad in ("-1", str(2**32), "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be an integer >= 0"):
            seed.type(bad)


@pytest.mark.parametrize("argv, option", [
    (["audit", "sis", "--thresholds", "1.5"], "--thresholds"), (["audit", "sis", "--thresholds", "0"], "--thresholds"),
    (["audit", "sis", "--batch-size", "0"], "--batch-size"), (["audit", "sis", "--show", "-1"], "--show"),
    (["audit", "cid", "--batch-size", "0"], "--batch-size"), (["audit", "simplify", "--steps", "0"], "--steps"),
    (["audit", "simplify", "--kl-tolerance", "-1"], "--kl-tolerance"),
])
def test_audit_options_out_of_range_are_one_line(argv, option, capsys):
    """Accepted before (τ = 1.5 made an empty row, --batch-size 0 a traceback, --show -1 a slice)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"keepbits: error: argument {option}: must be") and err.count("\n") == 1


def test_class_names_inline_or_in_a_file(tmp_path):
    """--class-names takes a JSON list as its help says (inline was "file not found"), or a file."""
    from keepbits.cli._common import _class_names

    (tmp_path / "names.txt").write_text("cat\ndog\n")
    assert _class_names('["cat", "dog"]') == _class_names(str(tmp_path / "names.txt")) == ("cat", "dog")
    with pytest.raises(InputError, match="expected a JSON list of strings"):
        _class_names("[1, 2]")
