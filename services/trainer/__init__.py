"""streamscore trainer service."""
