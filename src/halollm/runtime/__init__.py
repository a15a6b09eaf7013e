"""The distributed runtime: coordinator, workers, wire protocol and transport."""
