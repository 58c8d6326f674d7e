"""What a fine-tune trains: its settings, checked before any image is read.

`FinetuneSpec` is an ImageNet backbone with a new head, trained in two phases; `ScratchSpec`
is the small ConvNet trained from scratch, the baseline transfer learning is measured
against. Every field is a setting: the checkpoint key and the run record's `params` derive
from the fields, so no setting can be left out of either. Importing this module does not
import TensorFlow: only building a model does.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from cnncodes.core.choices import SMALL_CNN
from cnncodes.core.errors import CnnCodesError, check_types
from cnncodes.data.decode import check_resize
from cnncodes.nets.backbones import DEFAULT_BACKBONE, Backbone, get_backbone
from cnncodes.nets.models import build_classifier, small_cnn
from cnncodes.nets.weights import Weights

if TYPE_CHECKING:
    import keras

SMALL_CNN_SIZE = 64
SMALL_CNN_MIN_SIZE = 8  # two 3x3 convolutions and a 2x2 pooling leave at least 2x2
# Values kept for the backward pass per input value, at the least: every network here starts with layers of
# 32-96 channels at full or half resolution (VGG16's first block keeps 64 of them per pixel, MobileNetV2's stem
# and first expansion 32 and 96 at half the side), so 8 is below what any of them keeps.
ACTIVATIONS_PER_INPUT = 8


class Phase(NamedTuple):
    """One `model.fit`: its name, whether the backbone's top block trains, epochs and learning rate."""

    name: str
    unfreeze: bool
    epochs: int
    lr: float


@dataclass(frozen=True, kw_only=True)
class FinetuneSpec:
    """An ImageNet backbone and a new head, trained in two phases; every field is a setting.

    `unfreeze` is a layer name or a count of last layers: phase 2 trains the layers after it.
    Build one with `make_spec`, which checks the settings and resolves the weights.
    """

    backbone: str
    weights: Weights
    image_size: int
    resize: str
    unfreeze: str | int
    batch_size: int
    head_epochs: int
    fine_epochs: int
    head_lr: float
    lr: float
    dropout: float
    augment: bool
    cache_trunk: bool
    class_weight: str | None
    patience: int
    seed: int

    method = "finetune"

    @property
    def entry(self) -> Backbone:
        """The backbone's registry entry."""
        return get_backbone(self.backbone)

    @property
    def run_stem(self) -> str:
        """The run's name without the user's prefix."""
        return f"{self.backbone}-finetune"

    @property
    def described(self) -> dict[str, str]:
        """What the run record's `layer` and `classifier` columns say of this method."""
        unfrozen = f"last {self.unfreeze} layers" if isinstance(self.unfreeze, int) else f"after {self.unfreeze}"
        return {"layer": unfrozen, "classifier": "dense head"}

    def build(self, n_classes: int) -> tuple[keras.Model, keras.Model | None]:
        """The model to train and save, and its backbone, whose layers the phases freeze and unfreeze.

        Args:
            n_classes: outputs of the softmax head.

        Returns:
            The whole model (raw RGB pixels in) and the backbone network inside it.
        """
        return build_classifier(self.entry, self.image_size, n_classes, self.weights, self.dropout)

    def phases(self) -> list[Phase]:
        """The head on the frozen backbone, then the top block too at the low learning rate."""
        return [
            Phase(name="head", unfreeze=False, epochs=self.head_epochs, lr=self.head_lr),
            Phase(name="fine", unfreeze=True, epochs=self.fine_epochs, lr=self.lr),
        ]


@dataclass(frozen=True, kw_only=True)
class ScratchSpec:
    """The small ConvNet trained from scratch, all its layers in one phase: the baseline for transfer learning.

    It has no backbone to cut or unfreeze, so it carries only the settings it uses.
    """

    image_size: int
    resize: str
    batch_size: int
    epochs: int
    lr: float
    augment: bool
    class_weight: str | None
    patience: int
    seed: int

    backbone = SMALL_CNN
    method = "from-scratch"
    weights = Weights("none")
    cache_trunk = False
    run_stem = f"{SMALL_CNN}-scratch"
    described: ClassVar[dict[str, str]] = {"layer": "all layers", "classifier": "small ConvNet"}

    def build(self, n_classes: int) -> tuple[keras.Model, keras.Model | None]:
        """The small ConvNet (raw RGB pixels in) and no backbone: every layer trains.

        Args:
            n_classes: outputs of the softmax head.

        Returns:
            The model, and None for the backbone it does not have.
        """
        return small_cnn(self.image_size, n_classes), None

    def phases(self) -> list[Phase]:
        """One phase training every layer."""
        return [Phase(name="scratch", unfreeze=True, epochs=self.epochs, lr=self.lr)]


TrainingSpec = FinetuneSpec | ScratchSpec


def make_spec(
    backbone: str = DEFAULT_BACKBONE,
    *,
    weights: str = "imagenet",
    image_size: int | None = None,
    resize: str = "crop",
    batch_size: int = 32,
    head_epochs: int = 5,
    fine_epochs: int = 5,
    unfreeze: str | int | None = None,
    head_lr: float = 1e-3,
    lr: float = 1e-5,
    dropout: float = 0.2,
    augment: bool | None = None,
    cache_trunk: bool = False,
    class_weight: str | None = None,
    patience: int = 3,
    seed: int = 0,
) -> TrainingSpec:
    """Check the settings of a fine-tune before any image is read, and resolve its weights.

    Args:
        backbone: a registry name, or `smallcnn` for the small ConvNet trained from scratch
            (`head_epochs + fine_epochs` epochs at `head_lr`; needs `weights="none"`).
        weights: `imagenet`, `none` or the path of a Keras weights file.
        image_size: square input size (default: the backbone's; 64 for smallcnn).
        resize: `crop`, `squash` or `pad`, as in `extract`.
        batch_size: images per training step.
        head_epochs: epochs of phase 1 (the head).
        fine_epochs: epochs of phase 2 (the top block too).
        unfreeze: phase 2 trains the layers after this one, or this many last layers
            (default: the registry's last block).
        head_lr: Adam learning rate of phase 1.
        lr: Adam learning rate of phase 2.
        dropout: before the new softmax layer.
        augment: random flips, rotations, zooms and contrast (default: on, off with `cache_trunk`).
        cache_trunk: compute the frozen layers' activations once and train only above them.
        class_weight: `balanced` for imbalanced classes.
        patience: epochs without a better val accuracy before a phase stops.
        seed: shuffling and initialisation.

    Returns:
        A `FinetuneSpec`, or a `ScratchSpec` for `smallcnn`.

    Raises:
        CnnCodesError: a setting out of range, or settings that do not go together.
    """
    _check_training(head_epochs, fine_epochs, batch_size, head_lr, lr)
    check_resize(resize)
    if class_weight not in (None, "balanced"):
        raise CnnCodesError(f"class_weight takes 'balanced' or None (got {class_weight!r})")
    if not 0 <= dropout < 1 or patience < 1:
        raise CnnCodesError(f"--dropout takes 0 to 0.99 and --patience 1 or more (got {dropout} and {patience})")
    check_types(unfreeze=(unfreeze, (str, int, type(None))))
    shared: dict[str, Any] = {
        "resize": resize,
        "batch_size": batch_size,
        "augment": _augments(augment, cache_trunk),
        "class_weight": class_weight,
        "patience": patience,
        "seed": seed,
    }
    if backbone.lower() == SMALL_CNN:
        size = image_size or SMALL_CNN_SIZE
        _check_scratch(weights, unfreeze, cache_trunk, size)
        check_batch_fits(batch_size, size)
        return ScratchSpec(image_size=size, epochs=head_epochs + fine_epochs, lr=head_lr, **shared)
    entry = get_backbone(backbone)
    size = image_size or entry.default_size
    entry.check_size(size, entry.default_layer)
    check_batch_fits(batch_size, size)
    return FinetuneSpec(
        backbone=entry.name,
        weights=entry.resolve_weights(weights, entry.default_layer),
        image_size=size,
        unfreeze=parse_unfreeze(entry.finetune_after if unfreeze is None else str(unfreeze)),
        head_epochs=head_epochs,
        fine_epochs=fine_epochs,
        head_lr=head_lr,
        lr=lr,
        dropout=dropout,
        cache_trunk=cache_trunk,
        **shared,
    )


def _check_training(head_epochs: int, fine_epochs: int, batch_size: int, head_lr: float, lr: float) -> None:
    """At least one epoch in all, none negative; a batch size and learning rates that can train."""
    if min(head_epochs, fine_epochs) < 0 or head_epochs + fine_epochs == 0:
        raise CnnCodesError(
            f"--head-epochs and --fine-epochs take 0 or more epochs, at least one in all (got {head_epochs} and "
            f"{fine_epochs})"
        )
    if batch_size < 1 or not all(0 < rate < math.inf for rate in (head_lr, lr)):  # NaN compares false
        raise CnnCodesError(
            f"--batch-size must be at least 1 and learning rates positive numbers "
            f"(got {batch_size}, --head-lr {head_lr}, --lr {lr})"
        )


def check_batch_fits(batch_size: int, image_size: int) -> None:
    """Refuse a batch that cannot fit in this machine's memory, before TensorFlow fails on it with a traceback.

    The estimate is a lower bound: the batch as float32 pixels times `ACTIVATIONS_PER_INPUT`,
    the activations the lightest network here keeps for the backward pass per input value.

    Args:
        batch_size: images per training step.
        image_size: their square side in pixels.

    Raises:
        CnnCodesError: when even the lower bound exceeds the machine's physical memory.
    """
    need = batch_size * image_size**2 * 3 * 4 * ACTIVATIONS_PER_INPUT
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise CnnCodesError(
            f"--batch-size {batch_size} of {image_size}-px images needs at least {need / 2**30:,.0f} GiB to train, "
            f"this machine has {have / 2**30:.0f} GiB: use a smaller --batch-size or --image-size"
        )


def _augments(augment: bool | None, cache_trunk: bool) -> bool:
    """Whether the training images are augmented: by default unless the trunk is cached, which cannot."""
    augment = not cache_trunk if augment is None else augment
    if cache_trunk and augment:
        raise CnnCodesError(
            "--cache-trunk trains on activations computed once, so it cannot augment: "
            "drop --augment, or drop --cache-trunk"
        )
    return augment


def _check_scratch(weights: str, unfreeze: str | int | None, cache_trunk: bool, size: int) -> None:
    """The small ConvNet has no pretrained weights, no backbone to cut, and needs room for its layers."""
    if weights != "none":
        raise CnnCodesError(f"{SMALL_CNN} trains from scratch and has no pretrained weights: pass --weights none")
    if unfreeze or cache_trunk:
        raise CnnCodesError(
            f"{SMALL_CNN} trains all its layers from scratch: "
            "--unfreeze and --cache-trunk apply to ImageNet backbones only"
        )
    if size < SMALL_CNN_MIN_SIZE:
        raise CnnCodesError(f"{SMALL_CNN} needs images of at least {SMALL_CNN_MIN_SIZE} px (got --image-size {size})")


def parse_unfreeze(text: str) -> str | int:
    """`--unfreeze` as a layer name or a positive count of last layers.

    Args:
        text: the option as typed.

    Returns:
        The count when `text` is all digits, else the layer name.

    Raises:
        CnnCodesError: a count of 0, which would unfreeze nothing.
    """
    if not text.isdigit():
        return text
    if int(text) == 0:
        raise CnnCodesError("--unfreeze 0 unfreezes nothing: to train the head only, use --fine-epochs 0")
    return int(text)


def spec_params(spec: TrainingSpec) -> dict[str, Any]:
    """The settings of a spec as the run record lists them (weights are in its `extractor`).

    Args:
        spec: a fine-tune or from-scratch spec.

    Returns:
        Every field but the backbone and weights, by name, in field order.
    """
    return {f.name: getattr(spec, f.name) for f in fields(spec) if f.name not in ("backbone", "weights")}
