"""streamscore scorer service."""
