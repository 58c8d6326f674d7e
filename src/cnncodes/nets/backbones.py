"""The registry of frozen ImageNet networks: the one place that knows each backbone.

An entry says how to build the network (`keras.applications` constructor), what its
pixels must look like (input size, `preprocess_input`), where its ImageNet weights live
(Keras's canonical file name and URL) and which layers make good CNN codes (`taps`,
shallow to deep; the deepest is the default). Any other layer name works as well.

Importing this module does not import TensorFlow: only building a model does.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from cnncodes.core.errors import CnnCodesError, first_line
from cnncodes.nets.weights import UNTRAINED_SEED, ImagenetFile, Weights, resolve_weights

if TYPE_CHECKING:
    import keras

Pooling = Literal["avg", "max", "gem", "flatten"]
POOLINGS: tuple[str, ...] = get_args(Pooling)
_KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
# The ImageNet mean RGB that caffe-style preprocessing subtracts (Keras's `imagenet_utils`, mode "caffe").
_CAFFE_MEAN = (123.68, 116.779, 103.939)
# The largest input size: a batch of 32 RGB images at 2048 px is 1.6 GB as floats before the first layer.
MAX_SIZE = 2048


@dataclass(frozen=True)
class Backbone:
    name: str
    constructor: str
    module: str
    preprocessing: str
    default_size: int
    min_size: int
    taps: tuple[str, ...]
    weights_file: str
    # The RGB pixel (0-255) that the network's input normalisation maps to 0: its "no signal" input.
    zero_input: tuple[float, float, float]
    weights_url: str
    # `finetune` unfreezes every layer after this one: the last convolutional block.
    finetune_after: str = ""
    # The sizes `extract` sees an image at by default, averaging their codes (empty: `default_size` alone).
    code_sizes: tuple[int, ...] = ()
    # Several sizes must be multiples of this: the network pads its stride-2 layers by its input size
    # (Keras's `correct_pad`), which the one network built for every size cannot do.
    size_step: int = 1
    top_taps: tuple[str, ...] = ()
    top_weights_file: str | None = None
    top_weights_url: str | None = None
    # The MD5s Keras's applications pass to `get_file` (none is published for MobileNetV2).
    weights_md5: str | None = None
    top_weights_md5: str | None = None

    @property
    def default_layer(self) -> str:
        return self.taps[-1]

    @property
    def zero_pixel(self) -> tuple[int, int, int]:
        """The uint8 pixel nearest `zero_input`: what deleting a pixel sets it to (faithfulness, RISE's deletion).

        [-1, 1] networks map 127.5 to 0, which no uint8 is: 128 (round half to even) maps to 1/255.
        """
        r, g, b = (round(v) for v in self.zero_input)
        return r, g, b

    def default_sizes(self, pooling: str, layer: str) -> list[int]:
        """`code_sizes` where codes can be averaged: not flattened maps, whose length depends on the size,
        nor the classifier top, which takes one size."""
        averaged = self.code_sizes and pooling != "flatten" and not self.needs_top(layer)
        return list(self.code_sizes) if averaged else [self.default_size]

    def check_sizes(self, sizes: list[int], layer: str) -> None:
        for size in sizes:
            self.check_size(size, layer)
        if len(sizes) > 1 and any(size % self.size_step for size in sizes):
            raise CnnCodesError(
                f"{self.name} takes several sizes in multiples of {self.size_step} px only (got "
                f"{','.join(map(str, sizes))}): e.g. 224,288,384"
            )

    def needs_top(self, layer: str) -> bool:
        """Layers of the classifier top (VGG's fc1/fc2) need the network built with its top."""
        return layer in self.top_taps

    def imagenet_file(self, layer: str) -> ImagenetFile:
        """The ImageNet weights file the network cut at `layer` loads: with the classifier top for its layers."""
        if self.needs_top(layer):
            return self.top_file()
        return ImagenetFile(backbone=self.name, name=self.weights_file, url=self.weights_url, md5=self.weights_md5)

    def top_file(self) -> ImagenetFile:
        """The ImageNet weights of the whole network, its 1000-class classifier top included (`imagenet` loads them).

        Returns:
            Keras's file, its URL and MD5.

        Raises:
            CnnCodesError: the registry knows no such file for this backbone.
        """
        if not (self.top_weights_file and self.top_weights_url):
            raise CnnCodesError(f"{self.name} has no ImageNet classifier top in the registry")
        return ImagenetFile(
            backbone=self.name, name=self.top_weights_file, url=self.top_weights_url, md5=self.top_weights_md5
        )

    def resolve_weights(self, choice: str, layer: str, *, tried: str = "", advice: str | None = None) -> Weights:
        """`--weights imagenet|none|PATH` for the network cut at `layer` (`weights.resolve_weights` says how)."""
        return resolve_weights(choice, imagenet=self.imagenet_file(layer), tried=tried, advice=advice)

    def preprocess_input(self, x: Any) -> Any:
        """Keras's own `preprocess_input` for this network, applied to float pixels 0–255."""
        import keras

        return getattr(keras.applications, self.module).preprocess_input(x)

    def check_size(self, size: int, layer: str) -> None:
        if size < self.min_size:
            raise CnnCodesError(f"{self.name} needs images of at least {self.min_size} px (got --image-size {size})")
        if size > MAX_SIZE:
            raise CnnCodesError(
                f"--image-size {size} is over {MAX_SIZE} px: ImageNet networks see 224-600 px, and one batch of "
                f"such images would not fit in memory"
            )
        if self.needs_top(layer) and size != self.default_size:
            raise CnnCodesError(
                f"layer {layer} of {self.name} belongs to the classifier top, which takes "
                f"{self.default_size} px images only (got {size})"
            )

    def build_network(self, size: int | None, layer: str, weights: Weights) -> keras.Model:
        """The backbone itself, with `weights` loaded, taking preprocessed float pixels.

        `size` None builds it for images of any size (the caller checks the sizes it feeds).
        """
        if size is not None:
            self.check_size(size, layer)
        return self._constructed(size, weights, include_top=self.needs_top(layer))

    def build_imagenet_classifier(self, weights: Weights) -> keras.Model:
        """The whole ImageNet classifier, its softmax top included, for `default_size` images.

        Args:
            weights: the weights of `top_file` (or a file of the same network), resolved.

        Returns:
            The network: preprocessed float pixels in, the 1000 ImageNet class probabilities out.
        """
        return self._constructed(self.default_size, weights, include_top=True)

    def _constructed(self, size: int | None, weights: Weights, *, include_top: bool) -> keras.Model:
        import keras

        if weights.kind == "none":
            keras.utils.set_random_seed(UNTRAINED_SEED)
        constructor = getattr(keras.applications, self.constructor)
        network = constructor(include_top=include_top, weights=None, input_shape=(size, size, 3))
        if weights.path is not None:
            try:
                network.load_weights(weights.path)
            except Exception as e:
                raise CnnCodesError(f"weights file {weights.path} does not fit {self.name} ({first_line(e)})") from None
        return network


def _vgg(name: str, constructor: str, md5: str, top_md5: str) -> Backbone:
    return Backbone(
        name=name,
        constructor=constructor,
        module=name,
        preprocessing="caffe: RGB to BGR, minus ImageNet mean",
        zero_input=_CAFFE_MEAN,
        default_size=224,
        min_size=32,
        taps=("block3_pool", "block4_pool", "block5_pool"),
        weights_file=f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5",
        weights_url=f"{_KERAS_URL}{name}/{name}_weights_tf_dim_ordering_tf_kernels_notop.h5",
        finetune_after="block4_pool",
        top_taps=("fc1", "fc2"),
        top_weights_file=f"{name}_weights_tf_dim_ordering_tf_kernels.h5",
        top_weights_url=f"{_KERAS_URL}{name}/{name}_weights_tf_dim_ordering_tf_kernels.h5",
        weights_md5=md5,
        top_weights_md5=top_md5,
    )


_SCALE_TF = "tf: scale to [-1, 1]"
_MID_GREY = (127.5, 127.5, 127.5)
_MOBILENET_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
_MOBILENET_TOP_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"

REGISTRY: dict[str, Backbone] = {
    b.name: b
    for b in (
        _vgg("vgg16", "VGG16", "6d6bbae143d832006294945121d1f1fc", "64373286793e3c8b2b4e3219cbf3544b"),
        _vgg("vgg19", "VGG19", "253f8cb515780f3b799900260a226db6", "cbe5617147190e668d6c5d5026f83318"),
        Backbone(
            name="resnet50",
            constructor="ResNet50",
            module="resnet50",
            preprocessing="caffe: RGB to BGR, minus ImageNet mean",
            zero_input=_CAFFE_MEAN,
            default_size=224,
            min_size=32,
            taps=("conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
            weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_url=f"{_KERAS_URL}resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            finetune_after="conv4_block6_out",
            weights_md5="4d473c1dd8becc155b73f8504c6f6626",
            top_weights_file="resnet50_weights_tf_dim_ordering_tf_kernels.h5",
            top_weights_url=f"{_KERAS_URL}resnet/resnet50_weights_tf_dim_ordering_tf_kernels.h5",
            top_weights_md5="2cb95161c43110f7111970584f804107",
        ),
        Backbone(
            name="mobilenetv2",
            constructor="MobileNetV2",
            module="mobilenet_v2",
            preprocessing=_SCALE_TF,
            zero_input=_MID_GREY,
            default_size=224,
            min_size=32,
            taps=("block_3_expand_relu", "block_6_expand_relu", "block_13_expand_relu", "out_relu"),
            weights_file=_MOBILENET_FILE,
            weights_url=f"{_KERAS_URL}mobilenet_v2/{_MOBILENET_FILE}",
            top_weights_file=_MOBILENET_TOP_FILE,
            top_weights_url=f"{_KERAS_URL}mobilenet_v2/{_MOBILENET_TOP_FILE}",
            finetune_after="block_15_add",
            # Three sizes take 6.4x the time of one (still faster than ResNet50 or VGG16 at one) and add
            # about a point on both shared datasets (README, "Codes at several sizes"); the heavy networks keep one.
            code_sizes=(224, 288, 384),
            size_step=32,
        ),
        Backbone(
            name="efficientnetb0",
            constructor="EfficientNetB0",
            module="efficientnet",
            preprocessing="none: the network rescales and normalises itself",
            # its Normalization layer's ImageNet mean, as in Keras's `imagenet_utils` mode "torch"
            zero_input=(123.675, 116.28, 103.53),
            default_size=224,
            min_size=32,
            taps=("block3b_add", "block4c_add", "block6d_add", "top_activation"),
            weights_file="efficientnetb0_notop.h5",
            weights_url="https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
            finetune_after="block6d_add",
            weights_md5="50bc09e76180e00e4465e1a485ddc09d",
            top_weights_file="efficientnetb0.h5",
            top_weights_url="https://storage.googleapis.com/keras-applications/efficientnetb0.h5",
            top_weights_md5="902e53a9f72be733fc0bcb005b3ebbac",
            size_step=32,
        ),
        Backbone(
            name="inceptionv3",
            constructor="InceptionV3",
            module="inception_v3",
            preprocessing=_SCALE_TF,
            zero_input=_MID_GREY,
            default_size=299,
            min_size=75,
            taps=("mixed2", "mixed5", "mixed7", "mixed10"),
            weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_url=f"{_KERAS_URL}inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            finetune_after="mixed8",
            weights_md5="bcbd6486424b2319ff4ef7d526e38f63",
            top_weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
            top_weights_url=f"{_KERAS_URL}inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
            top_weights_md5="9a0d58056eeedaa3f26cb7ebd46da564",
        ),
        Backbone(
            name="xception",
            constructor="Xception",
            module="xception",
            preprocessing=_SCALE_TF,
            zero_input=_MID_GREY,
            default_size=299,
            min_size=71,
            taps=("block4_sepconv2_act", "block13_sepconv2_act", "block14_sepconv2_act"),
            weights_file="xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_url=f"{_KERAS_URL}xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
            # block13_pool feeds a residual add: the first layer whose output alone feeds the rest is in block14
            finetune_after="block14_sepconv1_act",
            weights_md5="b0042744bf5b25fce3cb969f33bebb97",
            top_weights_file="xception_weights_tf_dim_ordering_tf_kernels.h5",
            top_weights_url=f"{_KERAS_URL}xception/xception_weights_tf_dim_ordering_tf_kernels.h5",
            top_weights_md5="0a58e3b7378bc2990ea3b43d5981f1f6",
        ),
    )
}


# The backbone commands use unless told otherwise: the one whose ImageNet weights most users can get.
DEFAULT_BACKBONE = "mobilenetv2"


def get_backbone(name: str) -> Backbone:
    """The registry's entry for a backbone's name, in any case.

    Args:
        name: the backbone's name, e.g. `mobilenetv2`.

    Returns:
        Its entry.

    Raises:
        CnnCodesError: an unknown name, with the nearest known one when there is one.
    """
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        nearest = difflib.get_close_matches(name.lower(), REGISTRY, n=1)
        hint = f"did you mean {nearest[0]!r}? " if nearest else ""
        raise CnnCodesError(f"unknown backbone {name!r}: {hint}choose one of {', '.join(REGISTRY)}") from None
