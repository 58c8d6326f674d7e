"""The command line as a whole: what reaches the terminal."""

from __future__ import annotations

import os
import subprocess
import sys

NATIVE_LINES = ("absl::InitializeLog", "oneDNN custom operations")


def cnncodes(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from cnncodes.cli import app; sys.argv = ['cnncodes', *sys.argv[1:]]; app()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})


def test_tensorflow_start_up_lines_never_reach_the_terminal_unless_verbose():
    quiet = cnncodes("layers", "mobilenetv2", "--image-size", "32")
    assert quiet.returncode == 0, quiet.stderr
    assert "block_13_expand_relu" in quiet.stdout
    assert not any(line in quiet.stderr for line in NATIVE_LINES), quiet.stderr
    verbose = cnncodes("--verbose", "layers", "mobilenetv2", "--image-size", "32")
    assert verbose.returncode == 0 and any(line in verbose.stderr for line in NATIVE_LINES), verbose.stderr
