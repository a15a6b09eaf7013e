"""User-facing errors: the CLI prints these as one line, never as a traceback."""


class HaloError(Exception):
    """A problem the user can fix (bad path, unsupported model, bad option)."""


class ModelLoadError(HaloError):
    """The model file or folder cannot be read or is not supported."""
