"""`advise()`: measure the data, pick the strategy, find the wrong labels; the library call behind `cnncodes advise`.

The split is `extract`'s (same options, same plan), the strategy is measured on the train
and val images only, and the commands printed carry the split options, so the test images
stay unseen until the final score of the commands' runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from cnncodes.advise.bootstrap import PairedDifference, recommended
from cnncodes.advise.candidates import (
    Candidate,
    default_candidate,
    joined_candidates,
    kept_candidates,
    single_candidates,
)
from cnncodes.advise.classes import encode_classes
from cnncodes.advise.forward import TappedRows, TapsJob, tapped_rows
from cnncodes.advise.measure import Measured, gain, learning_curve, measure_all, simultaneous
from cnncodes.advise.network import POOLINGS, TapLayout, tap_channels
from cnncodes.advise.recommend import DataOptions, Quadrant, commands, features_folder, quadrant
from cnncodes.advise.report import write_advice
from cnncodes.advise.seed import seed_features, stored_rows
from cnncodes.advise.suspects import cross_class_copies, out_of_fold_probabilities, suspects
from cnncodes.codes.layout import CACHE_DIR
from cnncodes.codes.plan import Plan, check_out, discover_data, plan
from cnncodes.codes.reading import Files
from cnncodes.codes.spec import ExtractorSpec
from cnncodes.core import files as artifacts
from cnncodes.core.errors import CnnCodesError, check_types
from cnncodes.core.progress import progress_bar
from cnncodes.data.split import (
    DEFAULT_DUP_THRESHOLD,
    DEFAULT_FRACTIONS,
    check_dup_threshold,
    format_fractions,
    parse_fractions,
)
from cnncodes.nets.backbones import DEFAULT_BACKBONE, get_backbone
from cnncodes.runtime.runners import check_runtime

# Images measured at most (a stratified sample beyond): the measurements' time and memory stay bounded.
MAX_IMAGES = 10_000


@dataclass(frozen=True, kw_only=True)
class Advice:
    """What `advise` measured and recommends (`to_dict` is advice.json).

    Attributes:
        out: the folder advice.json and advice.html are in.
        quadrant: cs231n's case, measured.
        measured: every candidate's measurements, the default first.
        gains: each candidate's held-out accuracy minus the default's, with its interval.
        chosen: the recommended codes: the best candidate if its gain's interval excludes 0, else the default.
        curve: the chosen codes' held-out and train accuracy on growing shares of the images.
        suspects: the images whose label looks wrong, most suspect first.
        copies: near-duplicate images labelled with different classes.
        commands: what to run, the recommended next step first.
        images: how many images were found, measured and scored.
        skipped: (path, reason, category) of each file left out, as rejected.csv lists them.
        seconds: the time of each stage.
        seeded: the features folders of the commands that already hold their codes (`seed`).
    """

    out: Path
    quadrant: Quadrant
    measured: list[Measured]
    gains: dict[str, PairedDifference]
    chosen: Candidate
    curve: list[dict]
    suspects: list[dict]
    copies: list[list[str]]
    commands: list[str]
    images: dict[str, int]
    skipped: list[tuple[str, str, str]]
    seconds: dict[str, float]
    seeded: list[str] = field(default_factory=list)

    @property
    def default(self) -> Measured:
        """The measurements of what `extract` makes with every default."""
        return self.measured[0]

    @property
    def best(self) -> Measured:
        """The candidate with the highest held-out accuracy (the default on ties)."""
        return max(self.measured, key=lambda m: m.accuracy)


def advise(
    data: Path | str,
    out: Path | str,
    *,
    backbone: str = DEFAULT_BACKBONE,
    backbones: Sequence[str] = (),
    weights: str = "imagenet",
    image_size: str | None = None,
    resize: str = "crop",
    split: str | Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    dup_threshold: int = DEFAULT_DUP_THRESHOLD,
    batch_size: int = 32,
    workers: int | None = None,
    runtime: str = "onnx",
    max_images: int = MAX_IMAGES,
    progress: bool = True,
) -> Advice:
    """Measure which codes suit `data`, decide cs231n's quadrant, and list the labels that look wrong.

    Writes `out/advice.json` and `out/advice.html`; the forward pass's rows are kept in
    `out/.cache`, so an interrupted run resumes and a second run computes nothing.

    Args:
        data: a class-per-folder directory or a `path,label` CSV, as `extract` takes.
        out: the folder for the advice (created if missing).
        backbone: the network whose depths and poolings are measured.
        backbones: other networks measured too (each costs its forward pass).
        weights: `imagenet`, `none` (untrained) or a weights file, as `extract` takes.
        image_size: the input sizes, as `extract --image-size` (default: each backbone's).
        resize: `crop`, `squash` or `pad`.
        split: train,val,test fractions, as `extract`'s.
        seed: the split's hash seed.
        dup_threshold: pHash bits within which two images are duplicates (-1: off).
        batch_size: images per forward pass.
        workers: decoding threads.
        runtime: `onnx` (default) or `keras`, as `extract`'s.
        max_images: images measured at most; a larger dataset is sampled, every class in its share.
        progress: rich progress bars.

    Returns:
        The advice.

    Raises:
        CnnCodesError: for a wrong argument, or data too small to measure.
    """
    started = time.perf_counter()
    check_types(seed=(seed, int), batch_size=(batch_size, int), max_images=(max_images, int))
    if batch_size < 1 or max_images < 4:
        raise CnnCodesError("--batch-size must be at least 1 and --max-images at least 4")
    check_dup_threshold(dup_threshold)
    check_runtime(runtime)
    fractions = parse_fractions(split)
    names = list(dict.fromkeys([get_backbone(backbone).name, *(get_backbone(b).name for b in backbones)]))
    specs = {n: ExtractorSpec.create(backbone=n, weights=weights, image_size=image_size, resize=resize) for n in names}
    out = Path(out)
    check_out(data, out)
    dataset = discover_data(data)
    clock = {"discover": time.perf_counter() - started}
    with artifacts.exclusive(out / CACHE_DIR / "advise.lock", f"another cnncodes advise is writing to {out}"):
        lap = time.perf_counter()
        the_plan = plan(
            dataset,
            out,
            fractions=fractions,
            seed=seed,
            dup_threshold=dup_threshold,
            workers=workers,
            progress=progress,
        )
        images = _Images.of(the_plan, max_images, seed)
        clock["check and split"] = time.perf_counter() - lap
        tapped: dict[str, TappedRows] = {}
        layouts: dict[str, TapLayout] = {}
        for name, spec in specs.items():
            lap = time.perf_counter()
            job = TapsJob(spec=spec, runtime=runtime, paths=images.files, batch_size=batch_size, layout=_layout(spec))
            layouts[name], tapped[name] = job.layout, _forward(out, job, images, workers, progress)
            clock[f"forward pass ({name})"] = time.perf_counter() - lap
        images, rows = images.decoded(tapped)
        options = DataOptions(
            data=str(data),
            split=format_fractions(fractions),
            seed=seed,
            dup_threshold=dup_threshold,
            weights=weights,
            image_size=image_size,
            resize=resize,
            runtime=runtime,
        )
        advice = _advice(out, images, rows, layouts, names[0], options, clock, progress)
        if images.sampled == 0:
            advice = replace(advice, seeded=_seed(out, advice, images, rows, layouts, options))
        timed = replace(advice, seconds={**advice.seconds, "all": round(time.perf_counter() - started, 3)})
        return write_advice(timed, str(data))


@dataclass(frozen=True, kw_only=True)
class _Images:
    """The images measured: a sample of the usable ones (all of them up to `max_images`), by row."""

    root: Path | str
    paths: list[str]
    labels: np.ndarray
    subsets: np.ndarray
    groups: np.ndarray
    file_ids: list[str]
    index: np.ndarray  # each image's position among the usable ones (`plan_ids`)
    plan_ids: Sequence[str]  # every usable image's id, in the plan's order
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # rejected.csv's rows

    @property
    def found(self) -> int:
        """Usable images in the dataset."""
        return len(self.plan_ids)

    @classmethod
    def of(cls, the_plan: Plan, max_images: int, seed: int) -> _Images:
        labels = np.asarray(the_plan.split.labels)
        subsets = np.asarray(the_plan.split.subsets)
        strategy = subsets != "test"
        encode_classes(labels[strategy])  # too few images to measure: said before any forward pass
        taken = _sample(labels, max_images, seed)
        return cls(
            root=the_plan.usable.root,
            paths=[the_plan.split.paths[i] for i in taken],
            labels=labels[taken],
            subsets=subsets[taken],
            groups=np.asarray(the_plan.groups)[taken],
            file_ids=[the_plan.file_ids[i] for i in taken],
            index=taken,
            plan_ids=the_plan.file_ids,
            skipped=list(the_plan.rejected),
        )

    @property
    def files(self) -> Files:
        return Files(self.root, self.paths)

    @property
    def sampled(self) -> int:
        """Usable images left out of the sample (none up to `max_images`)."""
        return self.found - len(self.index)

    def decoded(self, rows: dict[str, TappedRows]) -> tuple[_Images, dict[str, np.ndarray]]:
        """These images less those that failed to decode in a forward pass, and each backbone's rows of them."""
        keep = np.arange(len(self.paths))
        failed: dict[str, tuple[str, str]] = {}
        for found in rows.values():
            keep = np.intersect1d(keep, found.kept)
            failed |= {self.paths[row]: (str(bad), bad.category) for row, bad in found.failed}
        kept = {name: np.asarray(found.rows[np.searchsorted(found.kept, keep)]) for name, found in rows.items()}
        images = replace(
            self,
            paths=[self.paths[i] for i in keep],
            labels=self.labels[keep],
            subsets=self.subsets[keep],
            groups=self.groups[keep],
            file_ids=[self.file_ids[i] for i in keep],
            index=self.index[keep],
            skipped=self.skipped + [(path, *why) for path, why in sorted(failed.items())],
        )
        return images, kept


def _sample(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """All rows up to `cap`; beyond, a seeded sample with every class in its share (two images at least)."""
    if len(labels) <= cap:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    taken = []
    for label in np.unique(labels):
        mine = np.flatnonzero(labels == label)
        share = max(2, round(cap * len(mine) / len(labels)))
        taken.append(rng.choice(mine, size=min(share, len(mine)), replace=False))
    return np.sort(np.concatenate(taken))


def _layout(spec: ExtractorSpec) -> TapLayout:
    """The backbone's taps at its registry depths, every pooling, the extractor's sizes."""
    entry = get_backbone(spec.backbone)
    return TapLayout(
        backbone=entry.name,
        layers=entry.taps,
        poolings=POOLINGS,
        sizes=tuple(spec.scales or [spec.image_size]),
        channels=tap_channels(entry.name, entry.taps),
    )


def _forward(out: Path, job: TapsJob, images: _Images, workers: int | None, progress: bool) -> TappedRows:
    """The backbone's tapped rows of every image, kept in the advice's cache by the layout's key."""
    work = out / CACHE_DIR / f"taps-{job.layout.key[:16]}"
    return tapped_rows(work, job, images.file_ids, workers=workers, progress=progress)


def _advice(
    out: Path,
    images: _Images,
    rows: dict[str, np.ndarray],
    layouts: dict[str, TapLayout],
    backbone: str,
    options: DataOptions,
    clock: dict[str, float],
    progress: bool,
) -> Advice:
    """Measure the candidates on the train and val images, choose, and score every image's label."""
    lap = time.perf_counter()
    strategy = images.subsets != "test"
    labels, groups = images.labels[strategy], images.groups[strategy]
    measured_rows = {name: found[strategy] for name, found in rows.items()}
    measured = _measured(measured_rows, layouts, backbone, labels, groups, progress)
    default = measured[0]
    confidence = simultaneous(len(measured) - 1)
    gains = {m.candidate.name: gain(m, default, confidence=confidence) for m in measured[1:]}
    best = max(measured, key=lambda m: m.accuracy)
    chosen = best if best is not default and recommended(gains[best.candidate.name]) else default
    mine = [m for m in measured if m.candidate.backbone == backbone]
    the_quadrant = quadrant(mine, labels, last_layer=layouts[backbone].layers[-1], confidence=confidence)
    clock["measurements"] = time.perf_counter() - lap
    lap = time.perf_counter()
    codes = chosen.candidate.codes(rows[chosen.candidate.backbone], layouts[chosen.candidate.backbone])
    curve = learning_curve(codes[strategy], labels, groups, full=chosen.probe)
    clock["learning curve"] = time.perf_counter() - lap
    lap = time.perf_counter()
    probabilities = out_of_fold_probabilities(codes, images.labels, images.groups, strength=chosen.probe.alpha)
    flagged = [
        {"path": images.paths[s.index], "subset": str(images.subsets[s.index]), **asdict(s)}
        for s in suspects(images.labels, probabilities)
    ]
    copies = [[images.paths[i] for i in group] for group in cross_class_copies(images.labels, images.groups)]
    clock["label issues"] = time.perf_counter() - lap
    return Advice(
        out=out,
        quadrant=the_quadrant,
        measured=measured,
        gains=gains,
        chosen=chosen.candidate,
        curve=curve,
        suspects=flagged,
        copies=copies,
        commands=commands(chosen.candidate, default.candidate, the_quadrant, options, out),
        images={"found": images.found, "measured": int(strategy.sum()), "scored": len(images.paths)},
        skipped=images.skipped,
        seconds={k: round(v, 3) for k, v in clock.items()},
    )


def _measured(
    rows: dict[str, np.ndarray],
    layouts: dict[str, TapLayout],
    backbone: str,
    labels: np.ndarray,
    groups: np.ndarray,
    progress: bool,
) -> list[Measured]:
    """Every depth and pooling of every backbone, then the best few with sizes kept, and the best depths joined.

    The default comes first. The second and third rounds are chosen on the first round's
    measurements of the same images, as every candidate is.
    """
    default = default_candidate(layouts[backbone])
    singles = [default] + [c for layout in layouts.values() for c in single_candidates(layout) if c != default]
    with progress_bar("Measuring candidates", len(singles) + 5, unit="set", enabled=progress) as advance:
        measured = measure_all(singles, rows, layouts, labels, groups, advance)
        mine = [(m.candidate, m.accuracy) for m in measured if m.candidate.backbone == backbone]
        kept = kept_candidates(mine, layouts[backbone])
        measured += measure_all(kept, rows, layouts, labels, groups, advance)
        mine += [(m.candidate, m.accuracy) for m in measured[len(singles) :]]
        joined = joined_candidates(mine, layouts[backbone])
        measured += measure_all(joined, rows, layouts, labels, groups, advance)
    return measured


def _seed(
    out: Path,
    advice: Advice,
    images: _Images,
    rows: dict[str, np.ndarray],
    layouts: dict[str, TapLayout],
    options: DataOptions,
) -> list[str]:
    """Store the codes of the chosen and the default setting where their advised `extract` finds them."""
    seeded = []
    for candidate in dict.fromkeys([advice.chosen, advice.default.candidate]):
        spec = ExtractorSpec.create(
            backbone=candidate.backbone,
            layer=candidate.layer_option,
            pooling=candidate.pooling,
            image_size=options.image_size,
            resize=options.resize,
            weights=options.weights,
            keep_sizes=candidate.sizes == "kept",
        )
        stored = stored_rows(candidate, rows[candidate.backbone], layouts[candidate.backbone])
        folder = features_folder(out, candidate)
        if seed_features(folder, spec, images.plan_ids, images.index, stored):
            seeded.append(str(folder))
    return seeded
