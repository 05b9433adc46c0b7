"""The one exception type users see: a clear message that names the file, tensor or option at fault."""

__all__ = ["WeightkitError"]


class WeightkitError(Exception):
    """Bad input or a failed precondition. The CLI prints the message (no traceback) and exits 1."""
