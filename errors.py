"""A user's mistake as one line: the error every script raises for bad input, and the wrapper that prints it.
A module of its own so that scripts without a model (social_pairs.py) start without importing torch.

    raise InputError("--out pairs/: holds other files (a.txt); pass --overwrite to replace them")
    run_cli(main)    # prints "error: ..." and exits with status 2
"""
import re
import sys


class InputError(ValueError):
    """A user's mistake (a file, a column, a flag); the message names the culprit and the scripts print it as one line."""


def run_cli(main):
    """Run a script's main(): a user's mistake ends in one line naming the culprit and exit status 2, not a traceback."""
    try:
        main()
    except InputError as e:
        # raised in a DataLoader worker, it arrives wrapped in the worker's traceback: keep its own last line
        message = re.sub(r"^[\w.]*InputError: ", "", str(e).strip().splitlines()[-1])
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
