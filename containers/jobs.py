"""Container operation handlers (registered with the runner)."""
