"""The exceptions the CLI turns into one message and an exit code, with no traceback.

Exit codes (``gptpipe`` and ``python -m gptpipe``; documented in docs/fault-tolerance.md):
  2   a mistake in the user's input (recipe, data, paths)
  3   training stopped on a NaN/inf loss or gradient
  4   not enough free disk space for the next checkpoint
  5   out of memory
  75  stopped by SIGTERM/SIGUSR1 after saving a checkpoint: run the same command again to continue
      (EX_TEMPFAIL, "try again later", from sysexits.h)
"""


class UserError(Exception):
    """A problem in the user's input. The CLI prints the message and exits non-zero, no traceback.

    Messages name the file, key or row, say what was expected and how to fix it.
    """

    exit_code = 2


class NonFiniteError(UserError):
    """The loss or a gradient (or, in PPO, rewards, values or ratios) became NaN or infinite."""

    exit_code = 3


class DiskFullError(UserError):
    """Not enough free space to write the next checkpoint; nothing was written."""

    exit_code = 4


class OutOfMemory(UserError):
    """The accelerator or host ran out of memory; the message says what to change."""

    exit_code = 5


class Preempted(UserError):
    """Stopped on a signal after a checkpoint was saved; the same command resumes from it."""

    exit_code = 75
