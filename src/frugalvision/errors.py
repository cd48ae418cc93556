"""Exceptions with messages a user can act on.

Every error raised for bad user input derives from :class:`FrugalVisionError`, so the CLI can print
one line and exit with code 2 instead of a stack trace.
"""

from __future__ import annotations


class FrugalVisionError(Exception):
    """Base class of all user-facing errors of the package."""


class ConfigError(FrugalVisionError, ValueError):
    """A configuration value, file or override is invalid."""


class DataError(FrugalVisionError, ValueError):
    """A data file or folder is missing, unreadable or malformed."""


class CheckpointError(FrugalVisionError, ValueError):
    """A checkpoint is missing, corrupt, foreign or incompatible with the model."""


class TrainingDivergedError(FrugalVisionError, FloatingPointError):
    """Training stopped on a non-finite loss or weights; the last good checkpoint is kept."""


class MissingDependencyError(FrugalVisionError, ImportError):
    """An optional dependency is needed for a feature but is not installed."""
