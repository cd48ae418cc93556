"""The base-install suite runs the installed ``frugalvision`` command, not this checkout's sources."""
