"""Backbone preprocessing as a Keras layer, so saved models take raw RGB pixels.

Putting `preprocess_input` inside the model means an extractor or a fine-tuned model
cannot be fed differently prepared pixels by mistake, and the ONNX export carries it too.
"""

from __future__ import annotations

import keras

from .backbones import get_backbone


@keras.saving.register_keras_serializable(package="cnncodes")
class Preprocess(keras.layers.Layer):
    """Cast uint8 pixels to float and apply the named backbone's `preprocess_input`."""

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    def call(self, pixels):
        return get_backbone(self.backbone).preprocess_input(keras.ops.cast(pixels, "float32"))

    def get_config(self) -> dict:
        return {**super().get_config(), "backbone": self.backbone}
