"""The command line as a whole: what reaches the terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

NATIVE_LINES = ("absl::InitializeLog", "oneDNN custom operations")


def cnncodes(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`cnncodes *args` in a process of its own, with `env` added to the environment."""
    code = "import sys; from cnncodes.cli.main import app; sys.argv = ['cnncodes', *sys.argv[1:]]; app()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}, **env},
    )


@pytest.mark.slow
def test_tensorflow_start_up_lines_never_reach_the_terminal_unless_verbose():
    quiet = cnncodes("layers", "mobilenetv2", "--image-size", "32")
    assert quiet.returncode == 0, quiet.stderr
    assert "block_13_expand_relu" in quiet.stdout
    assert not any(line in quiet.stderr for line in NATIVE_LINES), quiet.stderr
    verbose = cnncodes("--verbose", "layers", "mobilenetv2", "--image-size", "32")
    assert verbose.returncode == 0 and any(line in verbose.stderr for line in NATIVE_LINES), verbose.stderr


def test_an_unwritable_output_is_one_line_not_a_traceback(tmp_path):
    from cnncodes.cli.main import app

    from .helpers import make_dataset, runner

    data = make_dataset(tmp_path / "data", per_class=6)
    fast = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--quiet"]
    assert runner.invoke(app, ["extract", str(data), "--out", str(tmp_path / "f"), *fast]).exit_code == 0
    fitted = runner.invoke(
        app, ["fit-svm", str(tmp_path / "f"), "--out", str(tmp_path / "m"), "--classifier", "logreg", "--quiet"]
    )
    assert fitted.exit_code == 0, fitted.output
    a_folder = tmp_path / "m"
    for args in (
        ["compare", str(a_folder), "--format", "csv", "--output", str(a_folder)],
        ["compare", str(a_folder), "--html", str(a_folder)],
        [
            "predict",
            str(a_folder / "vgg16-block5_pool-logreg.joblib"),
            str(data / "stripes"),
            "--format",
            "json",
            "--output",
            str(a_folder),
            "--quiet",
        ],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "is a folder: give the name of a file to write" in " ".join(result.stderr.split()), result.stderr


def test_help_shows_the_extras_install_command_whole():
    from typer.testing import CliRunner

    from cnncodes.cli.main import app

    shown = CliRunner().invoke(app, ["extract", "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "'cnncodes[ray]'" in shown.output


def test_version_is_the_installed_packages():
    from importlib.metadata import version

    from typer.testing import CliRunner

    from cnncodes.cli.main import app

    shown = CliRunner().invoke(app, ["--version"])
    assert shown.exit_code == 0 and shown.stdout == f"cnncodes {version('cnncodes')}\n"


def test_tensorflows_retracing_notes_are_dropped_unless_verbose(caplog, monkeypatch):
    import logging

    import cnncodes  # noqa: F401 - importing the package installs the filter

    note = "5 out of the last 5 calls to <function f> triggered tf.function retracing. Tracing is expensive"
    tf_logger = logging.getLogger("tensorflow")
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        tf_logger.warning(note)
        tf_logger.warning("another warning")
        monkeypatch.setenv("CNNCODES_VERBOSE", "1")
        tf_logger.warning(note)
    assert [r.getMessage() for r in caplog.records] == ["another warning", note]


def test_a_mistyped_class_weight_is_named_by_its_option(tmp_path):
    from typer.testing import CliRunner

    from cnncodes.cli.main import app

    for command in ("fit-svm", "finetune"):
        args = [command, str(tmp_path), "--out", str(tmp_path / "m"), "--class-weight", "balancd"]
        shown = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert shown.exit_code == 2 and "'--class-weight'" in shown.output and "'balanced'" in shown.output
    assert not (tmp_path / "m").exists()


def help_of(*command: str, columns: int = 80) -> str:
    """What `cnncodes COMMAND --help` shows on a terminal `columns` wide."""
    from cnncodes.cli.main import app

    from .helpers import runner

    shown = runner.invoke(app, [*command, "--help"], env={"COLUMNS": str(columns)})
    assert shown.exit_code == 0, shown.output
    return shown.output


def option_line(command: str, option: str) -> str:
    """The line of `command --help` (300 columns wide) that shows `option`, or "" if it has none."""
    lines = help_of(command, columns=300).splitlines()
    return next((line for line in lines if option in line.strip("│ ").split()), "")


COMMANDS = ("extract", "fit-svm", "finetune", "compare", "predict", "serve", "prepare", "backbones", "layers", "demo")


def test_help_lists_the_commands_in_pipeline_order_and_flags_take_no_value():
    listing = help_of()
    assert [listing.index(f" {command} ") for command in COMMANDS] == sorted(
        listing.index(f" {command} ") for command in COMMANDS
    )
    assert "Pipeline" in listing and "Tools" in listing
    for command in COMMANDS:
        shown = help_of(command, columns=200)
        assert "<bool>" not in shown and "<list[" not in shown, shown  # a flag takes no value
    assert "--flip " in option_line("extract", "--flip") and option_line("extract", "--flip").count("<") == 0
    assert "<kind>" in option_line("fit-svm", "--classifier")
    assert "<path>" in option_line("compare", "models...")


def test_help_paragraphs_wrap_to_the_terminal_not_to_the_source():
    paragraph = (
        "Accuracy has its 95% interval, or mean ± sd over repeated splits; calibration is the ECE and the AUROC "
        "of the confidence (their means over repeated splits); wider terminals add balanced accuracy and macro-F1."
    )
    assert paragraph in help_of("compare", columns=300)
    narrow = help_of("compare")
    assert all(len(line) <= 80 for line in narrow.splitlines())
    assert " ".join(narrow.split()).count(paragraph) == 1


def test_backbones_keeps_every_name_whole_at_80_columns():
    import re

    from cnncodes.nets.backbones import REGISTRY

    shown = cnncodes("backbones", COLUMNS="80")
    assert shown.returncode == 0, shown.stderr
    assert all(len(line) <= 80 for line in shown.stdout.splitlines()), shown.stdout
    words = set(re.findall(r"[\w.\-]+", shown.stdout))
    for entry in REGISTRY.values():
        names = {entry.name, *entry.taps, *entry.top_taps, entry.weights_file}
        assert names <= words, names - words
    assert "224,288,384" in shown.stdout


def test_seed_seeds_the_split_in_every_command_that_makes_one():
    from cnncodes.cli.main import app

    from .helpers import runner

    commands = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    seeded = [command for command in commands if option_line(command, "--seed")]
    assert {"extract", "finetune", "advise"} <= set(seeded)
    assert all("split's hash" in option_line(command, "--seed") for command in seeded), seeded
    assert "initialisation" in option_line("finetune", "--init-seed")
    assert "folds" in option_line("fit-svm", "--cv-seed") and not option_line("fit-svm", "--seed")
    refused = runner.invoke(app, ["fit-svm", "features", "--out", "m", "--seed", "1"])
    assert refused.exit_code == 2 and "--seed" in refused.output


def test_a_mistyped_choice_is_one_line_naming_the_nearest_and_case_does_not_matter(tmp_path):
    from cnncodes.cli.main import app

    from .helpers import runner

    missing, out = str(tmp_path / "missing"), str(tmp_path / "out")
    extract = ["extract", missing, "--out", out, "--weights", "none"]
    fit = ["fit-svm", missing, "--out", out]
    for args, typo, nearest in (
        ([*extract, "--backbone"], "mobilenet2", "mobilenetv2"),
        ([*extract, "--pooling"], "avgg", "avg"),
        ([*extract, "--resize"], "crops", "crop"),
        ([*extract, "--runtime"], "onnxx", "onnx"),
        ([*extract, "--engine"], "locl", "local"),
        ([*extract, "--precision"], "int88", "int8"),
        ([*fit, "--classifier"], "logrg", "logreg"),
        ([*fit, "--normalize"], "standrd", "standard"),
        ([*fit, "--class-weight"], "balancd", "balanced"),
        (["finetune", missing, "--out", out, "--backbone"], "smalcnn", "smallcnn"),
        (["compare", missing, "--format"], "markdwn", "markdown"),
        (["predict", missing, missing, "--format"], "jsn", "json"),
        (["layers"], "vgg166", "vgg16"),
    ):
        shown = runner.invoke(app, [*args, typo], env={"COLUMNS": "80"})
        assert shown.exit_code == 2, shown.output
        said = [line for line in shown.output.splitlines() if "Invalid value" in line]
        assert len(said) == 1 and f"{typo!r}: did you mean {nearest!r}?" in said[0], shown.output
        assert "Value error" not in shown.output
    advised = runner.invoke(app, ["advise", missing, "--out", out, "--backbones", "mobilenetv2,MobileNet2"])
    assert advised.exit_code == 2 and "unknown backbone 'MobileNet2': did you mean 'mobilenetv2'?" in advised.output
    for args in (
        [*extract, "--backbone", "MobileNetV2", "--pooling", "MAX", "--resize", "Pad", "--precision", "FP32"],
        [*fit, "--classifier", "LogReg", "--normalize", "L2", "--class-weight", "Balanced"],
        ["compare", missing, "--format", "JSON"],
    ):
        taken = runner.invoke(app, args)  # the choices pass; the missing data stops the command
        assert taken.exit_code == 2 and "Invalid value" not in taken.output and "Error:" in taken.output, taken.output
    assert not (tmp_path / "out").exists()


def test_progress_bars_fit_80_columns_with_their_counts_whole(tmp_path):
    from .helpers import FAST_ARGS, make_dataset

    data = make_dataset(tmp_path / "data", per_class=6)
    loud = [arg for arg in FAST_ARGS if arg != "--quiet"]
    shown = cnncodes("extract", str(data), "--out", str(tmp_path / "f"), *loud, COLUMNS="80")
    assert shown.returncode == 0, shown.stderr
    bars = [line for line in shown.stderr.splitlines() if "img/s" in line]
    assert len(bars) == 2 and all("18/18" in bar and "ETA" in bar for bar in bars), shown.stderr
    assert all(len(line) <= 80 for line in shown.stderr.splitlines()), shown.stderr
    code = (
        "from cnncodes.core.progress import progress_bar\n"
        "with progress_bar('Fine-tuning (head) epoch 3/5', 18, unit='batch') as advance: advance(18)\n"
        "with progress_bar('Extracting ' + 'x' * 100, 1360) as advance: advance(1360)"
    )
    env = {**os.environ, "COLUMNS": "80"}
    drawn = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    lines = [line.rsplit("\r", 1)[-1] for line in drawn.stdout.splitlines() + drawn.stderr.splitlines()]
    lines = [re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", line) for line in lines if "ETA" in line]
    assert "Fine-tuning (head) epoch 3/5" in lines[0] and "18/18" in lines[0]  # the epoch is kept
    assert "1360/1360" in lines[1] and "…" in lines[1] and lines[1].rstrip().endswith("0:00:00")
    assert all(len(line.rstrip()) <= 80 for line in lines), lines
