"""`cnncodes fit-svm`: linear models, SVMs and k-NN fitted on CNN codes, each scored once on the test subset."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

import typer
from rich.text import Text

from cnncodes.cli.app import command
from cnncodes.cli.options import ClassWeightOpt, one_of, out_console, user_errors
from cnncodes.core.choices import KINDS, MAX_EXACT, Normalize
from cnncodes.runs.report import explain, rank, rich_table

if TYPE_CHECKING:
    ClassifierName: TypeAlias = str
else:
    ClassifierName = Literal[(*KINDS, "all")]
# The parameters the summary line shows of each fitted model, where its search chose them.
CHOSEN = ("normalize", "C", "gamma", "n_neighbors", "loss", "alpha")
# A parameter named in the summary by what it means to the user: k-NN's k counts images (see `_chosen`).
GRID_WORDS = {"n_neighbors": "k"}


@command("fit-svm")
def fit_svm(
    features: Annotated[Path, typer.Argument(help="Features folder written by `cnncodes extract`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the .joblib bundles and .json run records.")],
    classifier: Annotated[
        list[str],
        typer.Option(
            parser=one_of(ClassifierName),
            metavar="<kind>",
            help=f"Classifier to fit (repeatable): {', '.join(KINDS)} or all "
            f"(the first four; above {MAX_EXACT:,} training codes logreg and sgd).",
        ),
    ] = ["all"],  # noqa: B006 - Typer's list default
    normalize: Annotated[
        Normalize,
        typer.Option(
            parser=one_of(Normalize),
            help="Feature normalisation before the classifier; auto: standard, l2 or none, chosen by cross-validation.",
        ),
    ] = "auto",
    pca: Annotated[int | None, typer.Option(min=1, help="Reduce codes to N principal components first.")] = None,
    cv: Annotated[int, typer.Option(help="Cross-validation folds on train+val; 0 chooses on the val subset.")] = 5,
    class_weight: ClassWeightOpt = None,
    n_jobs: Annotated[int, typer.Option(help="Parallel jobs for the search (-1: all cores).")] = -1,
    cv_seed: Annotated[int, typer.Option(help="Seed of the cross-validation folds.")] = 0,
    name: Annotated[str | None, typer.Option(help="Prefix of the run names.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")] = False,
    repeats: Annotated[
        int,
        typer.Option(
            min=1,
            help="Score on K duplicate-aware splits of the same images "
            "(the features' own, then seeds after it): mean ± sd.",
        ),
    ] = 1,
) -> None:
    """Fit linear SVM, logistic regression, RBF SVM and k-NN (or SGD) on CNN codes; score each on the test subset."""
    from cnncodes.classify.fit import fit_classifiers, release_workers

    with user_errors():
        records = fit_classifiers(
            features,
            out=out,
            classifiers=classifier,
            normalize=normalize,
            pca=pca,
            cv=cv,
            class_weight=class_weight,
            n_jobs=n_jobs,
            seed=cv_seed,
            name=name,
            progress=not quiet,
            repeats=repeats,
        )
    with user_errors(f"{', '.join(r['run'] for r in records)} saved in {out}."):
        if not quiet:
            _summary(records, out)
        release_workers()  # where Ctrl-C is still handled (exit 130), not as Python exits


def _summary(records: list[dict], out: Path) -> None:
    """The table of the runs, ranked, and a line per run: what its search chose and where it is saved."""
    title = f"Fitted on {records[0]['n_train']} images, scored on {records[0]['n_test']} test images"
    ranked = rank(records)
    out_console.print(rich_table(ranked, title=title, width=out_console.width))
    for record in records:
        edges = ", ".join(GRID_WORDS.get(e, e) for e in record["grid_edges"])
        edges = f"; at the edge of its grid: {edges}" if edges else ""
        model = out / record["model_file"]
        out_console.print(
            Text(f"{record['run']}: {_chosen(record['params'])} (cv score {record['cv_score']:.3f}{edges}) -> {model}"),
            soft_wrap=True,
        )
    out_console.print(Text(explain(ranked)))


def _chosen(params: dict[str, Any]) -> str:
    """The values the search chose, k-NN's k in images as its grid counts them (`n_neighbors` counts codes:
    trained on several views of each image, the model's k is the images' k times the views)."""
    views = params.get("views") or 1
    shown = []
    for key, value in params.items():
        if key == "n_neighbors":
            images = value // views
            codes = f" = {value} codes, {views} per image" if views > 1 else ""
            shown.append(f"k={images} image{'s' * (images != 1)}{codes}")
        elif key in CHOSEN:
            shown.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(shown)
