"""The one error class of the user's input to a run: `UsageError`."""

from __future__ import annotations

import re
from collections.abc import Callable

_PARAMETER = re.compile(r"`([A-Za-z_]\w*)`")


class UsageError(ValueError):
    """What the user asked for was refused: an option value, a model, data files, an output directory
    that cannot be written. The `pyprune-fast` command prints it as one line and exits with status 2;
    every other exception is a bug of ours (a traceback, status 1).

    Args:
        message: what was wrong and what was expected, each parameter it is about written by its
            library name in backquotes: "`rounds` must be >= 1, got 0". `str()` drops the backquotes
            (rounds must be >= 1, got 0); the command line writes its flags there (`spelled`).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.parameters = tuple(dict.fromkeys(_PARAMETER.findall(message)))

    def __str__(self) -> str:
        return self.spelled(lambda name: name)

    def spelled(self, spell: Callable[[str], str | None]) -> str:
        """The message with each parameter written as `spell(name)`.

        Args:
            spell: a parameter's spelling (the command line's: `"--" + name.replace("_", "-")`), or
                None for a name it does not know, which then keeps its backquotes (text quoted from
                elsewhere, such as another library's message, may hold backquotes of its own).

        Returns:
            The message.
        """

        def spelled(match: re.Match) -> str:
            written = spell(match.group(1))
            return match.group(0) if written is None else written

        return _PARAMETER.sub(spelled, self.args[0])
