"""The load-balancing scheduler: device and link profiles in, a placement out (pure)."""
