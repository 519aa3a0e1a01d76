"""streamscore library: settings, codecs, features, registry, drift statistics."""
