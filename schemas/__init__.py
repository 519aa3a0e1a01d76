"""Avro schemas (data files)."""
