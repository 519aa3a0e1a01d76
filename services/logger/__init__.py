"""streamscore logger service."""
