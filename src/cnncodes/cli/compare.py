"""`cnncodes compare`: every run scored on the same test set, ranked, as a table, CSV, JSON, Markdown or HTML."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from cnncodes.cli.app import command
from cnncodes.cli.options import OUTPUT_HELP, one_of, out_console, user_errors
from cnncodes.core.progress import console as err_console
from cnncodes.runs.html import html_report
from cnncodes.runs.report import Format, explain, render, rich_table
from cnncodes.runs.report import compare as run_compare


@command("compare")
def compare(
    models: Annotated[list[Path], typer.Argument(help="Folders of run records (the --out of fit-svm and finetune).")],
    format: Annotated[Format, typer.Option("--format", "-f", parser=one_of(Format), help="Output format.")] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o", help=OUTPUT_HELP)] = None,
    html_path: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained HTML report.")] = None,
) -> None:
    """Rank the runs on one split by their CV score, choose the first; report every test accuracy against it.

    select is the CV score (a fine-tune, which has none: its validation accuracy), never the test
    accuracy: the test images only report. p is the two-sided test that a run's test accuracy
    differs from the chosen run's.

    Accuracy has its 95% interval, or mean ± sd over repeated splits; calibration is the ECE and
    the AUROC of the confidence (their means over repeated splits); wider terminals add balanced
    accuracy and macro-F1.
    """
    from cnncodes.core.files import check_file_target, write_bytes_atomic

    with user_errors():
        for target in (output, html_path):
            if target:
                check_file_target(target)
        records = run_compare(models)
        read = [Path(r["record_path"]) for r in records]
        read += [path.with_name(r["model_file"]) for path, r in zip(read, records) if r.get("model_file")]
        for target in (output, html_path):
            if target:
                check_file_target(target, read)
        text = None if format == "table" and not output else render(records, "csv" if format == "table" else format)
        if html_path:
            write_bytes_atomic(html_path, _report(records, html_path).encode())
        if text is not None and output:
            write_bytes_atomic(output, text.encode("utf-8", "surrogateescape"))
    if text is None:
        title = f"{len(records)} run{'s' * (len(records) != 1)}, {records[0]['n_test']} test images"
        out_console.print(rich_table(records, title=title, width=out_console.width))
        out_console.print(Text(explain(records)))
    elif not output:
        typer.echo(text, nl=False)
    if html_path:
        err_console.print(Text(f"Report written to {html_path}"), soft_wrap=True)


def _report(records: list[dict], html_path: Path) -> str:
    """The HTML report, with heat maps of the chosen run's mistakes in a folder beside it when they can be made."""
    from cnncodes.core.errors import CnnCodesError
    from cnncodes.core.progress import warn
    from cnncodes.explain.mistakes import explain_mistakes

    maps_folder = html_path.with_name(f"{html_path.stem}-maps")
    try:
        maps, sheet = explain_mistakes(records[0], maps_folder)
    except CnnCodesError as e:
        warn(f"the report shows the mistakes without heat maps: {e}")
        return html_report(records)
    return html_report(records, maps=maps, sheet=sheet.relative_to(html_path.parent).as_posix())
