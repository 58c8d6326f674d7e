"""From the measurements to cs231n's quadrant, the recommended setting and the commands that make it.

cs231n's transfer-learning notes decide by two facts: how much data there is, and how far
it is from ImageNet. Here both are measured: "different" means an earlier depth beats the
last layer beyond the bootstrap interval (the network's last, most ImageNet-specific
features are not the best), "large" means enough images per class that training more of
the network is not bound to overfit.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnncodes.advise.bootstrap import PairedDifference, paired_bootstrap, recommended
from cnncodes.advise.candidates import Candidate
from cnncodes.advise.measure import RESAMPLES, Measured
from cnncodes.nets.backbones import DEFAULT_BACKBONE, get_backbone

# Train and val images per class (the median class) from which a dataset counts as large.
LARGE_PER_CLASS = 1000


@dataclass(frozen=True, kw_only=True)
class Quadrant:
    """Where the data sits among cs231n's four cases, and the evidence for it.

    Attributes:
        size: `small` or `large`.
        similarity: `similar` or `different` (to ImageNet's objects).
        per_class: the median class's train and val images.
        depth_gain: best earlier depth minus best last-layer candidate, with its interval (None: one depth).
    """

    size: str
    similarity: str
    per_class: int
    depth_gain: PairedDifference | None

    @property
    def name(self) -> str:
        """E.g. `small, similar`."""
        return f"{self.size}, {self.similarity}"


def quadrant(
    measured: Sequence[Measured], labels: np.ndarray, *, last_layer: str, confidence: float = 0.95, seed: int = 0
) -> Quadrant:
    """Decide the quadrant from the measurements of the default backbone's candidates.

    Args:
        measured: its candidates' measurements.
        labels: (n,) the classes of the images measured.
        last_layer: the backbone's deepest tap.
        confidence: the coverage of the interval of the best earlier depth's gain (`simultaneous`:
            it is the best of several).
        seed: seeds the bootstrap.

    Returns:
        The quadrant.
    """
    per_class = int(np.median(np.unique(labels, return_counts=True)[1]))
    size = "large" if per_class >= LARGE_PER_CLASS else "small"
    last = [m for m in measured if m.candidate.layers == (last_layer,)]
    earlier = [m for m in measured if last_layer not in m.candidate.layers]
    if not last or not earlier:
        return Quadrant(size=size, similarity="similar", per_class=per_class, depth_gain=None)
    best_last = max(last, key=lambda m: m.accuracy)
    best_earlier = max(earlier, key=lambda m: m.accuracy)
    gain = paired_bootstrap(
        candidate=best_earlier.probe.correct,
        default=best_last.probe.correct,
        confidence=confidence,
        resamples=RESAMPLES,
        seed=seed,
    )
    similarity = "different" if recommended(gain) else "similar"
    return Quadrant(size=size, similarity=similarity, per_class=per_class, depth_gain=gain)


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """The data, split and network options every printed command carries, so they all make advise's split."""

    data: str
    split: str
    seed: int
    dup_threshold: int
    weights: str = "imagenet"
    image_size: str | None = None
    resize: str = "crop"
    runtime: str = "onnx"

    def split_args(self) -> list[str]:
        """The split options as command-line arguments."""
        return ["--split", self.split, "--seed", str(self.seed), "--dup-threshold", str(self.dup_threshold)]

    def network_args(self, *, extract: bool) -> list[str]:
        """`--weights` and `--resize`, and for `extract` `--image-size` and `--runtime`, where not the defaults."""
        args = [] if self.weights == "imagenet" else ["--weights", self.weights]
        args += [] if self.resize == "crop" else ["--resize", self.resize]
        if extract:
            args += [] if self.image_size is None else ["--image-size", self.image_size]
            args += [] if self.runtime == "onnx" else ["--runtime", self.runtime]
        return args


def extract_args(candidate: Candidate) -> list[str]:
    """The `extract` options that make `candidate`'s codes (its defaults left out).

    Args:
        candidate: the setting.

    Returns:
        The options.
    """
    args = backbone_args(candidate)
    if candidate.layers != (get_backbone(candidate.backbone).default_layer,):
        args += ["--layer", candidate.layer_option]
    if candidate.pooling != "avg":
        args += ["--pooling", candidate.pooling]
    if candidate.sizes == "kept":
        args += ["--keep-sizes"]
    return args


def backbone_args(candidate: Candidate) -> list[str]:
    """`--backbone NAME`, unless the candidate's is the default one."""
    return [] if candidate.backbone == DEFAULT_BACKBONE else ["--backbone", candidate.backbone]


def features_folder(out: Path, candidate: Candidate) -> Path:
    """The features folder the advised `extract` of `candidate` writes, under advise's folder.

    Args:
        out: advise's folder.
        candidate: the setting.

    Returns:
        The folder.
    """
    return out / f"features-{candidate.name.replace('/', '-').replace('+', '-')}"


def commands(
    chosen: Candidate, default: Candidate, the_quadrant: Quadrant, options: DataOptions, out: Path
) -> list[str]:
    """The commands to run, the recommended next step first; the defaults' codes too, so `compare` ranks both.

    Args:
        chosen: the recommended codes.
        default: the default codes.
        the_quadrant: the data's quadrant.
        options: the data and split options.
        out: advise's folder, under which the commands write.

    Returns:
        Shell command lines.
    """
    models = out / "models"
    lines = []
    for candidate in dict.fromkeys([chosen, default]):
        features = features_folder(out, candidate)
        extract = ["cnncodes", "extract", options.data, "--out", str(features), *extract_args(candidate)]
        lines += [
            extract + options.network_args(extract=True) + options.split_args(),
            ["cnncodes", "fit-svm", str(features), "--out", str(models)]
            + ([] if candidate == default else ["--name", "advised"]),  # a pooling alone would not tell the runs apart
        ]
    if the_quadrant.size == "large":  # training more of the network comes first; the codes are its baseline
        finetune = ["cnncodes", "finetune", options.data, "--out", str(models), *backbone_args(chosen)]
        finetune += options.network_args(extract=False) + options.split_args()
        if the_quadrant.similarity == "similar":
            finetune += ["--cache-trunk"]  # the top block and head: ImageNet's lower features fit as they are
        else:
            finetune += ["--unfreeze", chosen.layers[0]]  # from the depth that transfers best on
        lines.insert(0, finetune)
    lines.append(["cnncodes", "compare", str(models), "--html", str(out / "report.html")])
    return [shlex.join(line) for line in lines]
