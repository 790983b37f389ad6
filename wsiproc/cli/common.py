"""What the commands share: errors → exit codes (in one place), options merged over a config file, file specs."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import click

from ..errors import UsageError, WsiprocError
from click.core import ParameterSource
from ..config import load_config_file

#: Exit status per error type, first match wins: everything the package raises for a user to act on is a
#: WsiprocError, and only these lines decide how the command ends.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = ((UsageError, 2), (WsiprocError, 1))


def exit_code(exc: BaseException) -> int:
    return next(code for kind, code in EXIT_CODES if isinstance(exc, kind))


def message(exc: WsiprocError) -> str:
    """The line shown for an error: `error: …` for a usage error, else the message (which names its file)."""
    return f"error: {exc}" if isinstance(exc, UsageError) else str(exc)


class Group(click.Group):
    """The `wsiproc` group: a WsiprocError from any command ends it with one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except WsiprocError as exc:
            click.echo(message(exc), err=True)
            sys.exit(exit_code(exc))


@contextlib.contextmanager
def usage_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Errors of these types inside the block are the user's to fix on the command line (exit 2)."""
    try:
        yield
    except UsageError:
        raise
    except kinds as exc:
        raise UsageError(str(exc)) from exc


def merged_options(ctx: click.Context, config_file: Path | None, schema: type, options: dict[str, tuple[str, object]]) -> dict:
    """The field values for `schema`: a --config file's, overridden by options typed on the command line.

    `options` maps each field to (click parameter name, value); an option left at its default fills a field only
    where the file does not set it."""
    values = load_config_file(config_file, schema) if config_file else {}
    for field_name, (param, value) in options.items():
        if field_name not in values or ctx.get_parameter_source(param) == ParameterSource.COMMANDLINE:
            values[field_name] = value
    return values
