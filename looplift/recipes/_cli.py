"""What the recipes' command lines share: one-line errors, numeric argument types, the run of a command.

Every bad argument or failure is one line ``<prog>: error: ...`` on stderr and a non-zero exit status, never
a traceback: 2 for arguments (by argparse, or :class:`UsageError` for ones that do not go together), 1 for a
failure while running, 130 for Ctrl-C. ``LOOPLIFT_TRACEBACK=1`` shows the traceback of an unexpected one.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

from looplift.errors import LoopliftError

__all__ = ["Parser", "UsageError", "number", "run_command", "fail", "POSITIVE", "COUNT", "NONNEGATIVE",
           "POSITIVE_FLOAT"]


class Parser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr (``prog: error: ...``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog.split()[0]}: error: {message} (see {self.prog} --help)\n")


class UsageError(Exception):
    """Arguments that each make sense but not together (exit status 2)."""


def number(kind: type, what: str, low: float, high: float = math.inf, *, open_low: bool = False,
           open_high: bool = False) -> Callable[[str], float]:
    """An argparse type: a `kind` (int or float) between `low` and `high` (each end included unless open)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") \
                from None
        if not ((low < v) if open_low else (low <= v)) or not ((v < high) if open_high else (v <= high)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v
    return parse


POSITIVE = number(int, "a positive integer", 1)
COUNT = number(int, "0 or more", 0)
NONNEGATIVE = number(float, ">= 0", 0)
POSITIVE_FLOAT = number(float, "> 0", 0, open_low=True)


def fail(prog: str, message: str, status: int = 1):
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(status) from None


def run_command(prog: str, command: Callable[[], None], *, expected: tuple[type, ...] = ()) -> None:
    """Run `command`, every failure one line (see the module docstring). `expected`: more exception types that
    are the user's (an unknown character, say), shown by their message."""
    try:
        command()
    except UsageError as e:
        fail(prog, str(e), status=2)
    except LoopliftError as e:   # (a checkpoint, say; its line in the recipe means nothing to a user of the CLI)
        fail(prog, e.message)
    except (OSError, *expected) as e:
        fail(prog, str(e))
    except KeyboardInterrupt:
        fail(prog, "interrupted", status=130)
    except Exception as e:   # a looplift bug: still one line
        if os.environ.get("LOOPLIFT_TRACEBACK"):
            raise
        fail(prog, f"internal error, please report it: {type(e).__name__}: {e} (LOOPLIFT_TRACEBACK=1 shows where)")
