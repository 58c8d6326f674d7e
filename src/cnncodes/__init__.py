"""cnncodes: image classification with little data.

A frozen ImageNet network turns each image into a CNN code; linear models and SVMs are
trained on the codes and compared with fine-tuning on the same held-out test set.
Importing the package is cheap: TensorFlow loads only when a network is built.
"""

from .tflogs import silence_tensorflow_start_up

silence_tensorflow_start_up()  # before anything can import TensorFlow

from .errors import CnnCodesError  # noqa: E402
from .extract import ExtractorSpec, ExtractResult, extract  # noqa: E402

__all__ = ["CnnCodesError", "ExtractResult", "ExtractorSpec", "extract"]
__version__ = "0.1.0"
