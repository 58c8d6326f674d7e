"""Heat maps of a run's most confident mistakes, for the report of `compare --html`.

A mistake the model made with confidence is where a look at its evidence pays most: a
background it learnt instead of the object, a label that is wrong.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from cnncodes.core.errors import CnnCodesError
from cnncodes.data.ingest import is_uri
from cnncodes.data.remote import joined
from cnncodes.explain.run import explain
from cnncodes.runs.html import confident_mistakes


def explain_mistakes(record: dict[str, Any], out: Path, *, limit: int = 12) -> tuple[dict[str, str], Path]:
    """Explain the `limit` most confident mistakes of a run into `out`, as pictures for a page.

    Args:
        record: the run's record, as `compare` read it (with its `record_path`).
        out: the folder for the maps and their contact sheet.
        limit: how many mistakes.

    Returns:
        The pictures as data URIs by the mistakes' test paths, and the contact sheet's path.

    Raises:
        CnnCodesError: a run without a model file beside its record, or images not on this machine.
    """
    if not record.get("model_file") or not record.get("record_path"):
        raise CnnCodesError(f"{record.get('run')} has no model file beside its record")
    model = Path(record["record_path"]).with_name(record["model_file"])
    mistakes = confident_mistakes(record, limit)
    data = record["dataset"]["data"]
    if is_uri(data):
        raise CnnCodesError(f"the images of {record['run']} are in an object store ({data}): explain them locally")
    run = explain(model, [joined(data, p["path"]) for p in mistakes], out, faithfulness=False, progress=False)
    pictures = {}
    for mistake, entry in zip(mistakes, run.images):
        if entry.maps:
            encoded = base64.b64encode((out / entry.maps[0].picture).read_bytes()).decode()
            pictures[mistake["path"]] = f"data:image/png;base64,{encoded}"
    return pictures, out / "index.html"
