"""SGD fitted on codes read a chunk at a time: the `sgd` kind of `CodesClassifier`, for codes larger than memory.

Only one chunk of codes is in memory at a time: the normalisation is fitted in one pass, and
each candidate (loss, alpha) by `partial_fit` over shuffled chunks, for several epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import product
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight

from cnncodes.classify.calibration import one_vs_rest_margins

# Codes read per `partial_fit` call (one chunk in memory at a time), and the passes over them.
SGD_CHUNK = 4096
_SGD_EPOCHS = 10
# ...and at least this many updates: 10 passes over a few dozen codes leave SGD far from converged.
_SGD_UPDATES = 20_000
# The grid: a linear SVM or logistic regression, and the regularisation.
_SGD_LOSSES = ("hinge", "log_loss")
SGD_ALPHAS = (1e-5, 1e-4, 1e-3, 1e-2)


def chunks(positions: np.ndarray, size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Positions in chunks, so that codes larger than memory are read (or scored) a chunk at a time.

    Codes are stored class by class: a chunk of consecutive rows would hold one class, so training
    shuffles them; a shuffled chunk is sorted, so a memmap is still read forward.

    Args:
        positions: the rows to read.
        size: rows per chunk.
        rng: shuffles the positions across chunks; None keeps their order.

    Returns:
        The chunks, together every position once.
    """
    if rng is None:
        return [positions[i : i + size] for i in range(0, len(positions), size)]
    order = rng.permutation(positions)
    return [np.sort(order[i : i + size]) for i in range(0, len(order), size)]


class StreamingFit:
    """Fits SGD candidates on rows of codes `X`, one chunk of them in memory at a time.

    Args:
        X: every code, anything indexable by an array of rows (a memory-mapped array).
        n_classes: the classes, coded 0..n_classes-1.
        weights: the class weights by class code, `balanced` or None.
        chunk_size: rows read at a time.
        seed: seeds the shuffling and SGD.
    """

    def __init__(self, X: Any, n_classes: int, weights: Any, chunk_size: int, seed: int):
        self.X, self.classes, self.chunk_size, self.seed = X, np.arange(n_classes), chunk_size, seed
        self.weights = weights

    def choose(
        self,
        rows: np.ndarray,
        codes: np.ndarray,
        fold: tuple[np.ndarray, np.ndarray],
        scalers: dict[str, Any],
        metric: Callable[[np.ndarray, np.ndarray], float],
    ) -> tuple[float, tuple[str, str, float]]:
        """The best candidate trained on one fold's training rows and scored on its held-out ones.

        One fold, not k: each candidate is several passes over codes that may not fit in memory.

        Args:
            rows: the rows of X to choose on.
            codes: their class codes.
            fold: (training, held-out) positions in `rows`.
            scalers: unfitted normalisations by name, each tried with every loss and alpha.
            metric: the score of held-out class codes and predicted ones; higher is better.

        Returns:
            The best score and its (normalisation name, loss, alpha); the first of equals, as GridSearchCV.
        """
        train, held = fold
        best, chosen = -1.0, ("", "", 0.0)
        for name, unfitted in scalers.items():
            scaler = self._scaler(rows[train], unfitted)
            for loss, alpha in product(_SGD_LOSSES, SGD_ALPHAS):
                model = self._model(rows[train], codes[train], scaler, loss, alpha)
                if (found := metric(codes[held], self.scores(model, rows[held]).argmax(axis=1))) > best:
                    best, chosen = found, (name, loss, alpha)
        return best, chosen

    def fitted(self, rows: np.ndarray, codes: np.ndarray, scaler: Any, loss: str, alpha: float) -> Pipeline:
        """The normalisation and SGD fitted on `rows`.

        Args:
            rows: the rows of X to fit on.
            codes: their class codes.
            scaler: an unfitted normalisation (a copy is fitted).
            loss: SGD's loss.
            alpha: its regularisation.

        Returns:
            The fitted pipeline, `normalize` then `model`.
        """
        return self._model(rows, codes, self._scaler(rows, scaler), loss, alpha)

    def scores(self, model: Pipeline, rows: np.ndarray) -> np.ndarray:
        """The one-vs-rest margins of `model` on rows of X, a chunk at a time.

        Args:
            model: a pipeline from `fitted`.
            rows: the rows of X to score.

        Returns:
            (rows, classes) margins.
        """
        parts = [
            one_vs_rest_margins(model.decision_function(np.asarray(self.X[chunk], np.float64)))
            for chunk in chunks(rows, self.chunk_size)
        ]
        return np.vstack(parts)

    def _scaler(self, rows: np.ndarray, unfitted: Any) -> Any:
        """A copy of the normalisation fitted on `rows` in one pass, shared by every candidate fitted on those rows."""
        scaler = clone(unfitted)
        for chunk in chunks(rows, self.chunk_size):
            scaler.partial_fit(self.X[chunk]) if isinstance(scaler, StandardScaler) else scaler.fit(self.X[chunk])
        return scaler

    def _model(self, rows: np.ndarray, codes: np.ndarray, scaler: Any, loss: str, alpha: float) -> Pipeline:
        weights = self.weights
        if weights == "balanced":  # partial_fit takes no "balanced": the weights it would compute, from all rows
            seen = np.unique(codes)
            weights = dict(zip(seen.tolist(), compute_class_weight(weights, classes=seen, y=codes)))
        sgd = SGDClassifier(loss=loss, alpha=alpha, class_weight=weights, random_state=self.seed)
        rng = np.random.default_rng(self.seed)
        # Fewer codes than a chunk: each chunk holds them several times, rather than thousands of tiny calls.
        positions = np.tile(np.arange(len(rows)), max(1, self.chunk_size // len(rows)))
        for _ in range(max(_SGD_EPOCHS, -(-_SGD_UPDATES // len(positions)))):
            for chunk in chunks(positions, self.chunk_size, rng):
                sgd.partial_fit(scaler.transform(self.X[rows[chunk]]), codes[chunk], classes=self.classes)
        return Pipeline([("normalize", scaler), ("model", sgd)])
