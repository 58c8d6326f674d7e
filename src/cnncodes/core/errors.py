"""The exception users see as a one-line message (exit code 2 in the CLI), and the warning category beside it."""

import re

# A flag as messages write it: `--batch-size`, not part of a longer word or a path.
_FLAG = re.compile(r"(?<![\w/.-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
# Flags whose library parameter has another name than the flag's own, with underscores.
_PARAMETERS = {"classifier": "classifiers", "cv-seed": "seed", "init-seed": "seed"}


def in_python_words(message: str) -> str:
    """A message written for the CLI, with each flag named as the parameter a Python caller passes.

    Messages are written once, in the CLI's words (`--batch-size 0`); a notebook reads
    `batch_size 0`.

    Args:
        message: the message as written.

    Returns:
        The message with `--flag-name` as `flag_name`.
    """
    return _FLAG.sub(lambda m: _PARAMETERS.get(m.group(1), m.group(1).replace("-", "_")), message)


class CnnCodesError(Exception):
    """Bad input, bad arguments or mismatched artifacts: something the user can fix.

    The message is complete on its own (what is wrong and what to do), so the CLI prints
    it as one line instead of a traceback. `str()` names parameters as Python callers pass
    them; `cli_message` names the CLI's flags.
    """

    @property
    def cli_message(self) -> str:
        """The message in the CLI's words."""
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return in_python_words(super().__str__())


class CnnCodesWarning(UserWarning):
    """Something the user should know that does not stop the work (skipped files, reduced folds, moved data).

    Raised with `warnings.warn`, so notebooks can filter it and tests can catch it with
    `pytest.warns(CnnCodesWarning)`; the CLI prints each as one "Warning:" line, in its own words.
    """

    def __str__(self) -> str:
        return in_python_words(super().__str__())


def first_line(error: BaseException) -> str:
    """What a library's exception says, in the one line a CnnCodesError message can quote."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


_WHAT = {bool: "True or False", int: "an integer", str: "a string"}


def check_types(**arguments: tuple[object, type | tuple[type, ...]]) -> None:
    """Refuse a library caller's argument of the wrong type, e.g. `flip="no"`, which Python would take as true.

    Each keyword is an argument's name and (its value, the type or types it may have); a bool is not an int here.
    """
    for name, (value, kind) in arguments.items():
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            kinds = kind if isinstance(kind, tuple) else (kind,)
            what = " or ".join(_WHAT.get(k, "None" if k is type(None) else k.__name__) for k in kinds)
            raise CnnCodesError(f"{name} must be {what} (got {value!r})")
