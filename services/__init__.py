"""Services: thin consume -> compute -> produce/write -> commit loops, and the CLI."""
