"""A backbone as the ImageNet classifier it was trained as: its top's weights, Keras's class index, the whole model.

Both files are found as every weights file is (`$CNNCODES_WEIGHTS_DIR`, Keras's cache, then a
download); offline, one line names every file missing and where to put it. Importing this
module does not import TensorFlow: only building the model does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from cnncodes.core.errors import CnnCodesError, first_line
from cnncodes.core.files import read_json
from cnncodes.nets.backbones import Backbone, get_backbone
from cnncodes.nets.weights import (
    WEIGHTS_DIR_ENV,
    ImagenetFile,
    Weights,
    download,
    find_file,
    keras_cache_dir,
    resolve_weights,
)

if TYPE_CHECKING:
    import keras

# Keras's own names of the 1000 ImageNet classes, as `decode_predictions` downloads them.
CLASS_INDEX = ImagenetFile(
    backbone="imagenet",
    name="imagenet_class_index.json",
    url="https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json",
    md5="c2c37ea517e94d9795004a39431a14cb",
)


class ImagenetClass(NamedTuple):
    """One ImageNet class: its WordNet id (n02123045) and its name (tabby)."""

    wnid: str
    name: str


def find_imagenet_files(
    entry: Backbone, *, weights: str = "imagenet", class_index: Path | str | None = None
) -> tuple[Weights, Path]:
    """The weights of the network with its classifier top and the class index, found, downloaded or named.

    Args:
        entry: the backbone's registry entry.
        weights: `imagenet` (Keras's file of the whole network, `Backbone.top_file`) or the path of one.
        class_index: the path of a class index like Keras's; None looks for Keras's own.

    Returns:
        The resolved weights (with their SHA-256) and the class index's path.

    Raises:
        CnnCodesError: untrained weights, a file given that is not there, or files neither found nor
            downloadable (one line naming each, and where to put it).
    """
    advice = "use imagenet, or the .h5 file of the whole network with its classifier top"
    if weights == "none":
        raise CnnCodesError(f"--weights none: an untrained network knows no ImageNet class; {advice}")
    top = entry.top_file()
    wanted = ([top] if weights == "imagenet" else []) + ([CLASS_INDEX] if class_index is None else [])
    located = _located(wanted)
    found = resolve_weights(weights, imagenet=top, advice=advice)
    index = located[CLASS_INDEX.name] if class_index is None else Path(class_index).expanduser()
    if not index.is_file():
        raise CnnCodesError(
            f"--class-index {class_index}: no such file; give Keras's {CLASS_INDEX.name} or one like it"
        )
    return found, index


def _located(files: list[ImagenetFile]) -> dict[str, Path]:
    """Each of `files` by name, found or else downloaded; those that can be neither are one error."""
    located: dict[str, Path] = {}
    failed: dict[ImagenetFile, str] = {}
    for file in files:
        try:
            located[file.name] = find_file(file.name) or download(file)
        except Exception as e:
            failed[file] = first_line(e)
    if failed:
        named = " and ".join(f"{f.name} (from {f.url})" for f in failed)
        folder = os.environ.get(WEIGHTS_DIR_ENV)
        place = f"${WEIGHTS_DIR_ENV} ({folder})" if folder else f"${WEIGHTS_DIR_ENV} (not set)"
        them = "them" if len(failed) > 1 else "it"
        raise CnnCodesError(
            f"{named}: in neither {place} nor Keras's cache {keras_cache_dir()}, and downloading failed "
            f"({next(iter(failed.values()))}): put {them} in the folder ${WEIGHTS_DIR_ENV} names, or in Keras's cache"
        )
    return located


def read_class_index(path: Path) -> list[ImagenetClass]:
    """The classes of a class index like Keras's (`{"0": ["n01440764", "tench"], …}`), by output index.

    Args:
        path: the JSON file.

    Returns:
        One class per output of the network, in output order.

    Raises:
        CnnCodesError: the file is not such an index.
    """
    try:
        index = read_json(path)
        classes = [ImagenetClass(*map(str, index[str(i)])) for i in range(len(index))]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CnnCodesError(
            f"{path} is not a class index like Keras's {CLASS_INDEX.name} ({first_line(e)}): delete it to "
            "download Keras's again, or give another with --class-index"
        ) from None
    return classes


def build_imagenet_model(backbone: str, weights: Weights) -> keras.Model:
    """uint8 RGB pixels in, the 1000 ImageNet class probabilities out: preprocessing, then the whole network.

    Args:
        backbone: the registry name.
        weights: the weights of the network with its classifier top, resolved.

    Returns:
        The Keras model, for `default_size` images.
    """
    import keras

    from cnncodes.nets.preprocessing import Preprocess

    entry = get_backbone(backbone)
    size = entry.default_size
    pixels = keras.Input((size, size, 3), dtype="uint8", name="pixels")
    network = entry.build_imagenet_classifier(weights)
    return keras.Model(pixels, network(Preprocess(entry.name)(pixels)), name=f"{entry.name}_imagenet")
