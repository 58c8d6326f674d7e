"""The command line as a whole: what reaches the terminal."""

from __future__ import annotations

import os
import subprocess
import sys

NATIVE_LINES = ("absl::InitializeLog", "oneDNN custom operations")


def cnncodes(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from cnncodes.cli.main import app; sys.argv = ['cnncodes', *sys.argv[1:]]; app()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
    )


def test_tensorflow_start_up_lines_never_reach_the_terminal_unless_verbose():
    quiet = cnncodes("layers", "mobilenetv2", "--image-size", "32")
    assert quiet.returncode == 0, quiet.stderr
    assert "block_13_expand_relu" in quiet.stdout
    assert not any(line in quiet.stderr for line in NATIVE_LINES), quiet.stderr
    verbose = cnncodes("--verbose", "layers", "mobilenetv2", "--image-size", "32")
    assert verbose.returncode == 0 and any(line in verbose.stderr for line in NATIVE_LINES), verbose.stderr


def test_an_unwritable_output_is_one_line_not_a_traceback(tmp_path):
    from typer.testing import CliRunner

    from cnncodes.cli.main import app

    from .conftest import make_dataset

    runner = CliRunner()
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
