"""The `cnncodes` command (the console script `cnncodes.cli.main:app`): a thin Typer layer over the library API.

Every command calls one library function and only formats its result. Errors a user can
fix (`CnnCodesError`) become one red line on stderr and exit code 2; Ctrl-C says how to
resume and exits 130. Each command lives in a module of its own, which registers it on
`app` when imported here.
"""

from cnncodes.cli import (  # noqa: F401 - importing a command's module registers the command
    advise,
    backbones,
    compare,
    demo,
    explain,
    extract,
    filters,
    finetune,
    fit_svm,
    imagenet,
    predict,
    prepare,
    serve,
)
from cnncodes.cli.app import app

__all__ = ["app"]
