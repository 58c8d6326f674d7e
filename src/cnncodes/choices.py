"""The classifier kinds and normalisations `fit-svm` offers, importable without scikit-learn.

The CLI builds its option choices from these at start-up; importing scikit-learn there
would cost every command, `extract` included, about two seconds.
"""

KINDS = ("linear-svm", "logreg", "rbf-svm", "knn")
NORMALIZERS = ("standard", "l2", "none")
