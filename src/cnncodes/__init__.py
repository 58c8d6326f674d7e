"""cnncodes: image classification with little data.

A frozen ImageNet network turns each image into a CNN code; linear models and SVMs are
trained on the codes and compared with fine-tuning on the same held-out test set::

    from cnncodes import extract, fit_svm, finetune, make_spec, compare, predict

Importing the package is cheap: scikit-learn loads with `fit_svm`, `CodesClassifier`,
`compare` or `predict`, TensorFlow only when a network is built.
"""

import importlib
import importlib.metadata
import sys
import types

from .tflogs import silence_tensorflow_start_up

silence_tensorflow_start_up()  # before anything can import TensorFlow

from .errors import CnnCodesError  # noqa: E402
from .extract import ExtractorSpec, extract  # noqa: E402

# Names of the public API defined in modules that are heavy to import, loaded on first use.
_LAZY = {
    "fit_svm": "classifiers",
    "CodesClassifier": "classifiers",
    "finetune": "finetune",
    "make_spec": "finetune",
    "predict": "predict",
    "compare": "report",
}

__all__ = [
    "CnnCodesError",
    "CodesClassifier",
    "ExtractorSpec",
    "compare",
    "extract",
    "finetune",
    "fit_svm",
    "make_spec",
    "predict",
]
__version__ = importlib.metadata.version("cnncodes")  # pyproject.toml says it


class _Package(types.ModuleType):
    """The package, whose `finetune` and `predict` stay the functions after their modules are imported.

    Python sets a package's attribute to a submodule when it is first imported, which would
    turn `cnncodes.predict` into the module `cnncodes/predict.py`; import from the module
    itself (`from cnncodes.finetune import FinetuneSpec`) for anything not in `__all__`.
    """

    def __getattribute__(self, name: str):
        if name in _LAZY:
            return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        return super().__getattribute__(name)

    def __dir__(self):
        return sorted(__all__)


sys.modules[__name__].__class__ = _Package
