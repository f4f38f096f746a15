"""One error type for bad user input: its message names the problem and the fix."""

from __future__ import annotations

import functools
import sys


class GenpiError(Exception):
    """Bad input (config, file, dataset, model path). Printed as one line by the entry points."""


def exit_on_error(fn):
    """Wrap a console entry point so a GenpiError prints one line and exits 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GenpiError as err:
            print(f"genpi: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
