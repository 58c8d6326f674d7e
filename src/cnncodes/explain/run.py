"""`explain`: heat maps of why a saved model decides, for images given as `predict` takes them.

A reader decodes batches exactly as `predict` does, the explainer gives probabilities and
maps, and a writer draws each map on its original image and writes it, every file atomically
inside `out`. Faithfulness (deletion and insertion AUC against a random map) is measured on
the same batches, through the whole model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cnncodes.codes.reading import ImageReader
from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import make_folder, write_bytes_atomic, write_json_atomic, write_npy_atomic
from cnncodes.core.progress import progress_bar
from cnncodes.data.decode import BadImage, load_rgb, square_box
from cnncodes.explain.explainers import UNITS, BundleExplainer, Explainer, Explanation, load_explainer
from cnncodes.explain.faithfulness import faithfulness as measured_faithfulness
from cnncodes.explain.faithfulness import random_baseline
from cnncodes.explain.featuremaps import feature_map_grid
from cnncodes.explain.place import upsampled
from cnncodes.explain.render import drawn, png_bytes, positive_top
from cnncodes.explain.sheet import write_sheet
from cnncodes.serving.predict import checked_inputs


@dataclass
class ClassMap:
    """One explained class of one image: where its map and picture are, and what the map holds."""

    label: str
    probability: float
    map: str
    picture: str
    min: float
    max: float
    intercept: float


@dataclass
class ImageExplanation:
    """One input image: its prediction, the box of it the network saw, its maps, and their faithfulness."""

    filename: str
    label: str | None = None
    probability: float | None = None
    box: list[float] | None = None
    maps: list[ClassMap] = field(default_factory=list)
    faithfulness: dict[str, float] | None = None
    feature_maps: str | None = None
    error: str | None = None


@dataclass
class ExplainRun:
    """What `explain` did: the method, its units, one entry per image, and the mean faithfulness."""

    model: str
    method: str | None
    units: str | None
    resize: str
    images: list[ImageExplanation]
    faithfulness: dict[str, float] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def explain(
    model: Path | str,
    images: str | Path | Sequence[str | Path],
    out: Path | str,
    *,
    class_name: str | None = None,
    top_k: int = 1,
    faithfulness: bool = True,
    feature_maps: str | None = None,
    batch_size: int = 16,
    weights: str | None = None,
    runtime: str = "onnx",
    progress: bool = True,
) -> ExplainRun:
    """Write a heat map of each image's evidence for its predicted class (or `class_name`) into `out`.

    Per image: `<name>.png` (the original image, the map over the part the network saw, the
    class and its probability), `<name>.npy` (the raw map at the feature map's resolution);
    with `top_k` > 1 also `<name>.top2.png`, … for the next classes. `explain.json` holds every
    entry and `index.html` a contact sheet.

    Args:
        model: a `.joblib` bundle from `fit_svm` (or a fine-tuned `.keras` model), its record beside it.
        images: image files, folders or glob patterns, as `predict` takes them.
        out: the folder to write into (created).
        class_name: explain this class for every image instead of the predicted one.
        top_k: explain the `top_k` most probable classes.
        faithfulness: measure deletion and insertion AUC of each map against a random map.
        feature_maps: also write `<name>.features.png`, the image's most active channels at this layer of
            a bundle's network.
        batch_size: images per forward pass.
        weights: where the model's weights file is now, if it moved.
        runtime: `onnx` or `keras`.
        progress: a rich progress bar.

    Returns:
        The run, also written to `out/explain.json`.

    Raises:
        CnnCodesError: bad arguments, an unknown class, or a model that cannot be explained.
    """
    inputs = checked_inputs(images, top_k=top_k, batch_size=batch_size, runtime=runtime)
    explainer = load_explainer(model, weights, runtime)
    spec = explainer.spec if isinstance(explainer, BundleExplainer) else None
    if feature_maps and spec is None:
        raise CnnCodesError("feature_maps shows a layer of a fit-svm bundle's network: give a .joblib bundle")
    choose = _chooser(explainer.classes, class_name, top_k)
    folder = Path(out)
    make_folder(folder)
    results = [ImageExplanation(path, error=error) for path, error in inputs]
    names = _output_names([path for path, _ in inputs], top_k)
    rows = [i for i, (_, error) in enumerate(inputs) if error is None]
    methods: set[str] = set()
    reader = ImageReader([Path(p) for p, _ in inputs], explainer.image_size, explainer.resize, batch_size)
    with (
        progress_bar("Explaining", len(rows), enabled=progress and bool(rows)) as advance,
        _Pictures(explainer, folder, names, results, ahead=2 * batch_size) as pictures,
    ):
        for batch in reader(rows):
            for row, bad in batch.failed:
                results[row].error = str(bad)
            if len(batch.rows):
                found = explainer.explain(batch.pixels, choose)
                methods.add(found.method)
                seed = int(batch.rows[0])
                scores = _faithfulness(explainer, batch.pixels, found, seed=seed) if faithfulness else None
                if feature_maps and spec:
                    paths = [folder / f"{names[row]}.features.png" for row in batch.rows]
                    feature_map_grid(batch.pixels, layer=feature_maps, paths=paths, extractor=spec)
                pictures.draw(batch.rows.tolist(), found, scores, feature_maps is not None)
            advance(len(batch.rows) + len(batch.failed))
    measured = [r.faithfulness for r in results if r.faithfulness]
    run = ExplainRun(
        model=str(model),
        method=",".join(sorted(methods)) or None,
        units="; ".join(UNITS[m] for m in sorted(methods)) or None,
        resize=explainer.resize,
        images=results,
        faithfulness=_means(measured) if measured else None,
    )
    write_json_atomic(folder / "explain.json", run.to_dict())
    write_sheet(folder, run.to_dict(), size=explainer.image_size, resize=explainer.resize)
    return run


def _chooser(classes: list[str], class_name: str | None, top_k: int):
    """The function picking each image's explained classes from its probabilities, (images, k) indices."""
    if class_name is not None:
        if class_name not in classes:
            raise CnnCodesError(f"unknown class {class_name!r}: this model knows {', '.join(map(repr, classes))}")
        wanted = classes.index(class_name)
        return lambda proba: np.full((len(proba), 1), wanted)
    k = min(top_k, len(classes))
    return lambda proba: np.argsort(-proba, axis=1, kind="stable")[:, :k]


def _output_names(paths: Sequence[str], top_k: int) -> list[str]:
    """A distinct file name stem per input (`a`, then `a-2`, … for another `a.jpg` in another folder).

    The maps of the next classes are `<stem>.top2`, …, `<stem>.top<top_k>`: no stem takes one of those names.
    """
    taken: set[str] = set()
    names = []
    for path in paths:
        stem = Path(path).stem or "image"
        name, n = stem, 1
        while taken.intersection(_files_of(name, top_k)):
            n += 1
            name = f"{stem}-{n}"
        taken.update(_files_of(name, top_k))
        names.append(name)
    return names


def _files_of(name: str, top_k: int) -> list[str]:
    return [name, *(f"{name}.top{rank}" for rank in range(2, top_k + 1))]


class _Pictures:
    """Draws and writes each image's maps on threads while the next batch runs (Pillow and NumPy release the GIL).

    At most `ahead` images wait to be drawn, so memory stays bounded however many images there are.
    """

    def __init__(
        self, explainer: Explainer, folder: Path, names: list[str], results: list[ImageExplanation], *, ahead: int
    ):
        self.explainer, self.folder, self.names, self.results, self.ahead = explainer, folder, names, results, ahead
        self.pool = ThreadPoolExecutor(2)
        self.pending: deque[tuple[int, Future]] = deque()

    def __enter__(self) -> _Pictures:
        return self

    def __exit__(self, *failed: object) -> None:
        try:
            while self.pending and failed[0] is None:
                self._collect()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def draw(self, rows: Sequence[int], found: Explanation, scores: list[dict] | None, feature_maps: bool) -> None:
        """Queue the pictures of a batch's images (`rows`), then collect those beyond the window."""
        for i, row in enumerate(rows):
            draw = partial(_written, self.explainer, self.folder, self.names[row], self.results[row].filename, found, i)
            self.pending.append((int(row), self.pool.submit(draw, scores[i] if scores else None, feature_maps)))
        while len(self.pending) > self.ahead:
            self._collect()

    def _collect(self) -> None:
        row, done = self.pending.popleft()
        self.results[row] = done.result()


def _written(
    explainer: Explainer,
    folder: Path,
    name: str,
    filename: str,
    found: Explanation,
    i: int,
    faithfulness: dict[str, float] | None,
    feature_maps: bool,
) -> ImageExplanation:
    """Draw and write image `i` of the batch's maps; its entry for explain.json."""
    try:
        image = load_rgb(filename, draft_size=explainer.image_size)
    except BadImage as e:  # changed since the reader decoded it
        return ImageExplanation(filename, error=str(e))
    top = int(np.argmax(found.probabilities[i]))
    entry = ImageExplanation(
        filename,
        explainer.classes[top],
        round(float(found.probabilities[i, top]), 6),
        box=[round(v, 3) for v in square_box(image.width, image.height, explainer.image_size, explainer.resize)],
        faithfulness=faithfulness,
        feature_maps=f"{name}.features.png" if feature_maps else None,
    )
    labels = explainer.classes
    for rank in range(found.maps.shape[-1]):
        grid = found.maps[i, :, :, rank]
        stem = name if rank == 0 else f"{name}.top{rank + 1}"
        explained = found.explained[i, rank]
        probability = float(found.probabilities[i, explained])
        caption = f"{labels[explained]}  {probability:.1%}  ({found.method})"
        picture = drawn(
            image, grid, size=explainer.image_size, resize=explainer.resize, top=positive_top(grid), caption=caption
        )
        write_npy_atomic(folder / f"{stem}.npy", grid.astype(np.float32))
        write_bytes_atomic(folder / f"{stem}.png", png_bytes(picture))
        entry.maps.append(
            ClassMap(
                label=labels[explained],
                probability=round(probability, 6),
                map=f"{stem}.npy",
                picture=f"{stem}.png",
                min=float(grid.min()),
                max=float(grid.max()),
                intercept=float(found.intercepts[i, rank]),
            )
        )
    return entry


def _faithfulness(explainer: Explainer, pixels: np.ndarray, found: Explanation, *, seed: int) -> list[dict[str, float]]:
    """Deletion and insertion AUC of each image's first map, and of a random map (seeded by `seed`).

    The perturbed images go through the model a batch's worth at a time, so the memory is a batch's.
    """
    size = explainer.image_size
    square = (0.0, 0.0, float(size), float(size))
    maps = np.stack([np.nan_to_num(upsampled(grid, square, size, size)) for grid in found.maps[..., 0]])
    classes, zero = found.explained[:, 0], explainer.zero_pixel
    score, n = explainer.probabilities, len(pixels)
    ours = measured_faithfulness(score, pixels=pixels, maps=maps, classes=classes, zero_pixel=zero, batch_size=n)
    grid = (found.maps.shape[1], found.maps.shape[2])
    chance = random_baseline(score, pixels=pixels, classes=classes, zero_pixel=zero, grid=grid, seed=seed, batch_size=n)
    return [
        {
            "deletion": round(float(ours.deletion[i]), 6),
            "insertion": round(float(ours.insertion[i]), 6),
            "random_deletion": round(float(chance.deletion[i]), 6),
            "random_insertion": round(float(chance.insertion[i]), 6),
        }
        for i in range(len(pixels))
    ]


def _means(scores: list[dict[str, float]]) -> dict[str, float]:
    return {name: round(float(np.mean([s[name] for s in scores])), 6) for name in scores[0]}
