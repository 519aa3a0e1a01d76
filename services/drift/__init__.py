"""streamscore drift service."""
