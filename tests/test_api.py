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
