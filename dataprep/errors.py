"""The base of mmpipe's own errors: what the user gave or asked for cannot be done.

Their messages say what is wrong and how to fix it, so the CLI prints them in one line
(`mmpipe: error: ...`, exit 2) and keeps the traceback for `--debug`.
"""

import os


class MmpipeError(Exception):
    """A config, an input, a store or a service that mmpipe cannot use, explained."""


def debugging() -> bool:
    """Whether the user asked for tracebacks (`mmpipe --debug`, or MMPIPE_DEBUG=1)."""
    return os.environ.get("MMPIPE_DEBUG") == "1"
