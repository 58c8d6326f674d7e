"""What the typed definitions of cnncodes' files share: strict kinds, ranges, and one error line per damaged file.

Each file format (the run record, the features folder's meta.json, the bundle's metadata) is a
pydantic model built from these parts; `validated` checks a value against one and turns what
pydantic found (several lines) or JSON nested too deeply into one `CnnCodesError` line that names
the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from cnncodes.core.errors import CnnCodesError

Unit = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Count = Annotated[StrictInt, Field(ge=0)]
Positive = Annotated[StrictInt, Field(ge=1)]
Name = Annotated[str, Field(min_length=1)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Strict(BaseModel):
    """Strict about kinds (no "0.5" for 0.5), tolerant of fields a later version adds."""

    model_config = ConfigDict(strict=True, extra="allow")


def validated(model: type[BaseModel], value: Any, path: Path | str, *, what: str, advice: str = "") -> None:
    """Check `value` (a file's parsed JSON, or what is about to be written) against `model`.

    Args:
        model: the file format's definition.
        value: what the file holds.
        path: the file, named in the error.
        what: the kind of file, as the error names it ("run record").
        advice: what to do, appended to the error (": run `cnncodes extract` again").

    Raises:
        CnnCodesError: one line naming the file and the first field that is missing, of the wrong kind or
            out of range (or that the JSON is nested too deeply to be such a file).
    """
    try:
        model.model_validate(_readable(value))
    except ValidationError as e:
        raise CnnCodesError(f"{path}: {describe(e, what)}{advice}") from None
    except RecursionError:
        raise CnnCodesError(f"{path}: nested too deeply to be a {what}{advice}") from None


def _readable(value: Any) -> Any:
    """The value as its JSON reads: tuples as lists, and strings with the surrogates of non-UTF-8 file names
    (which pydantic cannot read) made checkable."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_readable(k): _readable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_readable(v) for v in value]
    return value


def describe(error: ValidationError, what: str) -> str:
    """The first problem pydantic found, as "the <what>'s a.b is not valid (why)" or "the <what> lacks a.b".

    pydantic's own text is several lines, with a link.

    Args:
        error: what pydantic raised.
        what: the kind of file ("run record").

    Returns:
        The problem, in a phrase.
    """
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "missing":
        return f"the {what} lacks {where}"
    why = first["msg"].removeprefix("Value error, ")
    return f"the {what}'s {where} is not valid ({why})" if where else f"the {what} is not valid ({why})"
