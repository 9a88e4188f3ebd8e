"""A user's mistake as one line: the error every script raises for bad input, its one-line form, and the wrapper that
prints it. It imports nothing heavy: a module that only raises an error loads no model library.

    raise InputError("--out pairs/: holds other files (a.txt); pass --overwrite to replace them")
    one_line_errors(main)    # prints "error: ..." and exits with status 2 (cli.run_cli wraps it for the commands)
"""
import re
import sys


class InputError(ValueError):
    """A user's mistake (a file, a column, a flag); the message names the culprit and the scripts print it as one line."""


def first_line(error, width=160):
    """An exception's message as one short line (its type's name when it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:width]


def described(error):
    """An exception as "Type: the first line of its message" (its type's name alone when it has none)."""
    return f"{type(error).__name__}: {first_line(error)}" if str(error).strip() else type(error).__name__


def one_line_errors(main):
    """Run a script's main(): a user's mistake ends in one line naming the culprit and exit status 2, not a traceback."""
    try:
        main()
    except InputError as e:
        # raised in a DataLoader worker, it arrives wrapped in the worker's traceback: keep its own last line
        message = re.sub(r"^[\w.]*InputError: ", "", str(e).strip().splitlines()[-1])
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
