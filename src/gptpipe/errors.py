"""The one exception type for mistakes a user can fix (bad recipe, bad data, missing file)."""


class UserError(Exception):
    """A problem in the user's input. The CLI prints the message and exits non-zero, no traceback.

    Messages name the file, key or row, say what was expected and how to fix it.
    """
