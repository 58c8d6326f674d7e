"""The choices the CLI offers that live in heavy modules, importable without their imports.

The CLI builds its option choices from these at start-up; importing scikit-learn there
would cost every command, `extract` included, about two seconds (TensorFlow, eight).
"""

KINDS = ("linear-svm", "logreg", "rbf-svm", "knn")
NORMALIZERS = ("standard", "l2", "none")
# `finetune --backbone smallcnn`: the small ConvNet trained from scratch, the baseline for transfer learning.
SMALL_CNN = "smallcnn"
