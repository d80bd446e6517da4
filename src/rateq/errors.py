"""Errors rateq raises for problems a user can fix (bad input, missing files, mismatched models).

The CLI turns these into one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""


class RateQError(Exception):
    """A problem with the user's input or environment, stated so that it can be fixed."""
