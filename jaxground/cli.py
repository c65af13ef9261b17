"""What the command-line programs share: a user's mistake (a mistyped flag or config field,
a missing file, an impossible value, a checkpoint that does not fit) is one line on stderr
and a non-zero exit. Anything else is our bug and keeps its traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags

from jaxground.checkpoints.converted import CheckpointError
from jaxground.checkpoints.hf_convert import ConversionError
from jaxground.data.processor import BadImageError
from jaxground.eval.protocols import ProtocolError
from jaxground.models.config import ConfigError
from jaxground.training.config import ConfigValueError

USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, app.UsageError,
               CheckpointError, ConversionError, BadImageError, ProtocolError, ConfigError,
               ConfigValueError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (ml_collections nests a KeyError's message, with a
    "Did you mean" on a second line, inside an AttributeError)."""
    message = error
    while isinstance(message, BaseException) and message.args:
        message = message.args[0]
    return " ".join(str(message).split())


def fail(error: BaseException, code: int) -> None:
    print(f"error: {one_line(error)}", file=sys.stderr)
    sys.exit(code)


def run(main: Callable[[list[str]], None], define_flags: Callable[[], None],
        argv: list[str] | None = None) -> None:
    """Defines and parses the flags, then runs `main(remaining argv)`."""
    define_flags()
    try:
        rest = flags.FLAGS(sys.argv if argv is None else argv)
    except Exception as e:  # a bad flag, an unknown config field, a config file not there
        fail(e, 2)
    try:
        main(rest)
    except USER_ERRORS as e:
        fail(e, 2 if isinstance(e, app.UsageError) else 1)
    except OSError as e:  # ml_collections reports a config file it could not load on use
        if "config file" not in str(e):
            raise
        fail(e, 2)
