"""What several commands share: their parameters (declared once, Typer reads the Annotated metadata),
choices that forgive case and typos, where output goes, and how a user's error ends a command.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias, get_args

import typer
from rich.console import Console
from rich.markup import escape

from cnncodes.core.choices import SMALL_CNN
from cnncodes.core.errors import CnnCodesError
from cnncodes.core.progress import console as err_console
from cnncodes.data.decode import Resize
from cnncodes.data.split import DEFAULT_FRACTIONS
from cnncodes.nets.backbones import REGISTRY
from cnncodes.runtime.runners import Runtime

# Tables, CSV and JSON; progress, warnings and errors go to stderr (`err_console`).
out_console = Console()

# Backbone choices come from the registry, its one source; type checkers see plain strings.
if TYPE_CHECKING:
    BackboneName: TypeAlias = str
    TrainableName: TypeAlias = str
else:
    BackboneName = Literal[tuple(REGISTRY)]
    TrainableName = Literal[(*REGISTRY, SMALL_CNN)]


def one_of(choices: Any) -> Callable[[str], str]:
    """A Typer parser for a choice: any case of it is taken, and a typo is one line naming the nearest choice.

    Args:
        choices: the `Literal[...]` the parameter is annotated with.

    Returns:
        The parser, which returns the choice as the `Literal` spells it.
    """
    spelled = {str(choice).casefold(): str(choice) for choice in get_args(choices)}

    def parse(value: str) -> str:
        if value.casefold() in spelled:
            return spelled[value.casefold()]
        nearest = difflib.get_close_matches(value.casefold(), spelled, n=1)
        if nearest:
            raise typer.BadParameter(f"{value!r}: did you mean {spelled[nearest[0]]!r}?")
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(map(repr, spelled.values()))}")

    return parse


OUTPUT_HELP = "Write to this file instead of stdout (as CSV unless --format says otherwise)."
SPLIT_FRACTIONS = ",".join(map(str, DEFAULT_FRACTIONS))  # --split as the user types it

# Backbone names listed in the help text, which wraps between them; as a type they would be cut into pieces.
BACKBONES = ", ".join(REGISTRY)
BackboneOpt = Annotated[
    BackboneName,
    typer.Option(parser=one_of(BackboneName), metavar="<name>", help=f"Frozen ImageNet network: {BACKBONES}."),
]
WeightsOpt = Annotated[str, typer.Option(help="imagenet, none (untrained), or a .h5 weights file.")]
ResizeOpt = Annotated[
    Resize,
    typer.Option(parser=one_of(Resize), help="crop: centre square; squash: ignore aspect ratio; pad: white borders."),
]
ClassWeightOpt = Annotated[
    Literal["balanced"] | None,
    typer.Option(parser=one_of(Literal["balanced"]), help="balanced: for imbalanced classes."),
]
RuntimeOpt = Annotated[
    Runtime, typer.Option(parser=one_of(Runtime), help="Forward pass on ONNX Runtime (fast) or Keras.")
]
ModelArg = Annotated[Path, typer.Argument(help="A .joblib bundle or a .keras model, its .json run record beside it.")]
MovedWeightsOpt = Annotated[str | None, typer.Option(help="Where the model's weights file is now, if it moved.")]


def say_file_failed(filename: str, error: str | None) -> None:
    """One file the command could not read, on one line of stderr (a long path is never broken), escaped.

    Args:
        filename: the file as the user gave it.
        error: why it failed.
    """
    err_console.print(f"[yellow]{escape(filename)}: {escape(error or '')}[/]", highlight=False, soft_wrap=True)


@contextmanager
def user_errors(resume_hint: str = "nothing was written.") -> Iterator[None]:
    """CnnCodesError and OSError become one red line and exit 2; Ctrl-C exits 130.

    After Ctrl-C, what the library noted on the interrupt (what it had saved) replaces `resume_hint`.

    Args:
        resume_hint: what to tell the user after Ctrl-C when the library noted nothing.

    Raises:
        typer.Exit: 2 after a user's error, 130 after Ctrl-C.
    """
    try:
        yield
    except (CnnCodesError, OSError) as e:  # OSError: an unwritable --out, a file where a folder should be, a full disk…
        said = e.cli_message if isinstance(e, CnnCodesError) else str(e)
        err_console.print(f"[bold red]Error:[/] {escape(said)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt as e:
        err_console.print(f"Interrupted: {escape(' '.join(getattr(e, '__notes__', [])) or resume_hint)}")
        raise typer.Exit(130) from None
