"""Default limits of `halo serve` (no imports: the command line reads them at start-up)."""

DEFAULT_MAX_QUEUE = 16  # requests that may wait for the model; one more gets 429
DEFAULT_MAX_BODY = 1 << 20  # bytes of request body; more gets 413
