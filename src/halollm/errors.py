"""User-facing errors: the CLI prints these as one line, never as a traceback."""


class HaloError(Exception):
    """A problem the user can fix (bad path, unsupported model, bad option)."""


class ModelLoadError(HaloError):
    """The model file or folder cannot be read or is not supported."""


class ProtocolError(ValueError):
    """A datagram or control message that must be discarded; `reason` names the counter it
    is charged to (unauthenticated, replayed, malformed, …)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
