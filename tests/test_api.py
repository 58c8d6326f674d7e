"""The package's face: what a notebook gets from `import cnncodes`."""

from __future__ import annotations

import subprocess
import sys


def test_the_public_api_is_importable_from_the_top_and_stays_cheap():
    code = """
import sys
import cnncodes
heavy = sorted(m for m in ("sklearn", "tensorflow", "keras") if m in sys.modules)
import cnncodes.serving.predict, cnncodes.finetuning.train  # the submodules must not shadow the functions
from cnncodes import (CnnCodesError, CodesClassifier, ExtractorSpec, compare, extract, finetune, fit_svm,
                      make_spec, predict)
print(heavy, [f.__module__ for f in (compare, extract, finetune, fit_svm, make_spec, predict)],
      sorted(cnncodes.__all__) == sorted(dir(cnncodes)), CodesClassifier.__name__, issubclass(CnnCodesError, Exception))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "[]",
        "['cnncodes.runs.report',",
        "'cnncodes.codes.extract',",
        "'cnncodes.finetuning.train',",
        "'cnncodes.classify.fit',",
        "'cnncodes.finetuning.spec',",
        "'cnncodes.serving.predict']",
        "True",
        "CodesClassifier",
        "True",
    ]


def test_errors_name_the_parameter_for_python_callers_and_the_flag_for_the_cli(tmp_path):
    import pytest

    from cnncodes.core.errors import CnnCodesError
    from cnncodes.finetuning.spec import make_spec

    from .helpers import cli

    with pytest.raises(CnnCodesError) as refused:
        make_spec("smallcnn", weights="none", batch_size=0)
    assert str(refused.value).startswith("batch_size must be at least 1") and "--" not in str(refused.value)
    said = cli(
        "finetune", tmp_path, "--out", tmp_path / "m", "--backbone", "smallcnn", "--weights", "none", "--head-lr", "0"
    )
    assert said.exit_code == 2 and "--batch-size must be at least 1" in said.stderr
