"""`cnncodes prepare`: a model verified and converted for ONNX Runtime before it is served."""

from __future__ import annotations

from rich.text import Text

from cnncodes.cli.app import command
from cnncodes.cli.options import ModelArg, MovedWeightsOpt, out_console, user_errors


@command("prepare")
def prepare(model: ModelArg, weights: MovedWeightsOpt = None) -> None:
    """Verify a model and convert it for ONNX Runtime ahead of time (e.g. in a container build)."""
    from cnncodes.runtime.runners import cache_dir
    from cnncodes.serving.predict import load_predictor

    with user_errors():
        predictor = load_predictor(model, weights)
    out_console.print(
        Text(
            f"prepared {model} ({len(predictor.classes)} classes, {predictor.image_size} px input): "
            f"its runtime model is cached in {cache_dir() / 'onnx'}"
        ),
        soft_wrap=True,
    )
