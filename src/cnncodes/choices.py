"""The choices the CLI offers that live in heavy modules, importable without their imports.

The CLI builds its option choices from these at start-up; importing scikit-learn there
would cost every command, `extract` included, about two seconds (TensorFlow, eight).
"""

from typing import Literal, get_args

KINDS = ("linear-svm", "logreg", "rbf-svm", "knn", "sgd")
# auto: each of the others with its own grid, chosen by cross-validation.
Normalize = Literal["auto", "standard", "l2", "none"]
NORMALIZERS: tuple[str, ...] = get_args(Normalize)
# `finetune --backbone smallcnn`: the small ConvNet trained from scratch, the baseline for transfer learning.
SMALL_CNN = "smallcnn"
