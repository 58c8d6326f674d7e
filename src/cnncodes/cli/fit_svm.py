"""`cnncodes fit-svm`: linear models, SVMs and k-NN fitted on CNN codes, each scored once on the test subset."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, TypeAlias

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
    from cnncodes.classify.fit import fit_classifiers

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
    if quiet:
        return
    title = f"Fitted on {records[0]['n_train']} images, scored on {records[0]['n_test']} test images"
    ranked = rank(records)
    out_console.print(rich_table(ranked, title=title, width=out_console.width))
    for record in records:
        chosen = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in record["params"].items() if k in CHOSEN
        )
        edges = f"; at the edge of its grid: {', '.join(record['grid_edges'])}" if record["grid_edges"] else ""
        model = out / record["model_file"]
        out_console.print(
            Text(f"{record['run']}: {chosen} (cv score {record['cv_score']:.3f}{edges}) -> {model}"), soft_wrap=True
        )
    out_console.print(Text(explain(ranked)))
