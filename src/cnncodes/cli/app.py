"""The `cnncodes` Typer app, which every command module registers on, and how its help reads.

Commands list in the order data flows through them (extract, fit-svm, finetune, compare,
predict, serve), then the tools around them; each paragraph of help wraps to the terminal;
flags show no value and arguments that take several values show the kind of one.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from cnncodes.core.progress import warnings_on_console
from cnncodes.core.tflogs import VERBOSE_ENV

# `cnncodes --help`: each panel's commands, in this order.
HELP_PANELS = {
    "Pipeline": ("advise", "extract", "fit-svm", "finetune", "compare", "predict", "explain", "serve"),
    "Tools": ("prepare", "backbones", "layers", "filters", "imagenet", "demo"),
}
ORDER = [name for names in HELP_PANELS.values() for name in names]

Function = TypeVar("Function", bound=Callable[..., Any])


class _Items(TyperArgument):
    """An argument of several values, shown by the type of one (`models... <path>`), not as `<list[Path]>`."""

    def display_type_rich(self, ctx: Any) -> str:
        (item,) = get_args(self.type_descriptor.annotation)
        return "<path>" if item is Path else f"<{item.__name__}>"


def _as_typed(params: list[Any]) -> list[Any]:
    """Typer's help shows `<bool>` after a flag, which takes no value, and `<list[str]>` after a list argument."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag:
            param.metavar = ""  # an option's metavar replaces its type in the help
        elif isinstance(param, TyperArgument) and param.nargs == -1:
            param.__class__ = _Items  # an argument's metavar would replace its name instead
    return params


class Command(TyperCommand):
    """A command whose help shows what each parameter is typed as."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _as_typed(super().get_params(ctx))


class Group(TyperGroup):
    """The app: its commands in the order of `HELP_PANELS`, its own flags shown as flags."""

    def list_commands(self, ctx: Any) -> list[str]:
        return sorted(super().list_commands(ctx), key=ORDER.index)

    def get_params(self, ctx: Any) -> list[Any]:
        return _as_typed(super().get_params(ctx))


app = typer.Typer(
    cls=Group,
    help="Image classification with little data: CNN codes from frozen ImageNet networks, "
    "linear models and SVMs on them, compared with fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def command(name: str) -> Callable[[Function], Function]:
    """Register a function as the command `name`, in its panel of `HELP_PANELS`, its docstring as its help.

    Typer keeps the line breaks of a docstring's later paragraphs; here each paragraph is one
    line, which the terminal wraps.

    Args:
        name: the command's name, as listed in `HELP_PANELS`.

    Returns:
        The decorator, which returns the function unchanged.
    """
    panel = next(panel for panel, names in HELP_PANELS.items() if name in names)

    def register(function: Function) -> Function:
        paragraphs = (inspect.getdoc(function) or "").split("\n\n")
        text = "\n\n".join(" ".join(paragraph.splitlines()) for paragraph in paragraphs)
        app.command(name, cls=Command, help=text, rich_help_panel=panel)(function)
        return function

    return register


def _show_version(asked: bool) -> None:
    if asked:
        from cnncodes import __version__

        typer.echo(f"cnncodes {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", help="Also show TensorFlow's native log lines.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Options of every command; file names print as the bytes they are, UTF-8 or not; warnings as one line each."""
    ctx.with_resource(warnings_on_console())
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="surrogateescape")
