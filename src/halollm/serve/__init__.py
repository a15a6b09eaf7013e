"""`halo serve`: an OpenAI-compatible HTTP API in front of one device or a HALO cluster."""
