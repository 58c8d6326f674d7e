"""Labels as class indices, checked once for what every measurement needs: two classes, two images each."""

from __future__ import annotations

import numpy as np

from cnncodes.core.errors import CnnCodesError


def encode_classes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sorted classes and each image's index into them.

    A measurement of held-out accuracy needs at least two classes and, in each, one image
    to hold out and one to learn from; failing that, the numbers would be meaningless
    rather than merely noisy, so the caller gets one line saying what to add.

    Args:
        labels: (n,) the class of each image, any sortable values (names or ints).

    Returns:
        `(classes, index)`: the distinct classes in sorted order, and (n,) ints into them.

    Raises:
        CnnCodesError: one class only, or a class with fewer than 2 images.
    """
    classes, index, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise CnnCodesError(f"found {len(classes)} class; measuring needs at least 2 classes: add a class folder.")
    small = [str(name) for name, count in zip(classes, counts) if count < 2]
    if small:
        raise CnnCodesError(
            f"class {', '.join(small)} has fewer than 2 images; measuring needs 2 per class: add images or drop it."
        )
    return classes, index.reshape(-1)
