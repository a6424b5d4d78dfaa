"""User-facing errors: each names what went wrong and how to fix it.

The CLI prints an `OodbenchError` as one clean message (no traceback) and exits with code 2;
anything else is a bug and keeps its traceback.
"""


class OodbenchError(Exception):
    """An error caused by the user's input or environment, with a hint naming the fix."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message


class UnknownNameError(OodbenchError, KeyError):
    """A registry lookup for a name that is not registered."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        super().__init__(
            f"unknown {kind} {name!r}",
            f"use one of: {', '.join(valid)}" if valid else f"no {kind} is registered",
        )
        self.kind, self.name, self.valid = kind, name, valid


class Terminated(KeyboardInterrupt):
    """A SIGTERM (a cancelled CI job, `kill`, a scheduler's preemption) raised where Ctrl-C's
    KeyboardInterrupt would be, so training saves a checkpoint on either; the command then
    exits 143 (128 + SIGTERM) where Ctrl-C exits 130."""

    exit_code = 143


def interrupt_exit_code(e: KeyboardInterrupt) -> int:
    """The shell's code for how the command was stopped: 143 for SIGTERM, 130 for Ctrl-C."""
    return getattr(e, "exit_code", 130)


SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader left


def leave_closed_pipe() -> None:
    """`oodbench report | head`: the reader closed the pipe. Point stdout at /dev/null (so the
    interpreter's final flush does not fail again) and exit 141 like any Unix writer, not 1,
    which `report` uses for a failed gate."""
    import os
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(SIGPIPE_EXIT)
