"""cnncodes: image classification with little data.

A frozen ImageNet network turns each image into a CNN code; linear models and SVMs are
trained on the codes and compared with fine-tuning on the same held-out test set::

    from cnncodes import extract, fit_classifiers, finetune, make_spec, compare, predict

The sub-packages follow the data flow: `data` (images, checks, splits) → `nets` (the
backbone registry, weights, Keras builders) → `runtime` (ONNX Runtime) → `codes` (CNN
codes on disk) → `classify` and `finetuning` → `runs` (records, bundles, reports) →
`serving`, with `cli` on top.

Importing the package is cheap: every name below loads its module on first use, so
scikit-learn comes with `fit_classifiers` or `predict` and TensorFlow only when a network
is built.
"""

import importlib
import importlib.metadata
from typing import Any

from cnncodes.core.tflogs import silence_tensorflow_start_up

silence_tensorflow_start_up()  # before anything can import TensorFlow

# The public API: each name and the module that defines it, imported on first use (PEP 562).
_HOMES = {
    "CnnCodesError": "cnncodes.core.errors",
    "CnnCodesWarning": "cnncodes.core.errors",
    "load_features": "cnncodes.codes.features",
    "ExtractorSpec": "cnncodes.codes.spec",
    "extract": "cnncodes.codes.extract",
    "CodesClassifier": "cnncodes.classify.estimator",
    "fit_classifiers": "cnncodes.classify.fit",
    "fit_svm": "cnncodes.classify.fit",
    "finetune": "cnncodes.finetuning.train",
    "make_spec": "cnncodes.finetuning.spec",
    "FinetuneSpec": "cnncodes.finetuning.spec",
    "ScratchSpec": "cnncodes.finetuning.spec",
    "compare": "cnncodes.runs.report",
    "predict": "cnncodes.serving.predict",
}

__all__ = sorted(_HOMES)
__version__ = importlib.metadata.version("cnncodes")  # pyproject.toml says it


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
