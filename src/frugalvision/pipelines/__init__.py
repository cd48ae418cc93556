"""End-to-end jobs behind the CLI commands (each usable from Python too)."""
