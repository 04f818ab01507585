"""Exception types raised for user input and corrupt files.

Every message is one line that names the problem and how to fix it.
"""

from __future__ import annotations


class AutocompressError(ValueError):
    """Base class of autocompress' own errors (a ``ValueError``: bad input)."""


class PlanError(AutocompressError):
    """A compression plan or search space that cannot be applied to the model."""


class ArtifactError(AutocompressError):
    """An artifact directory that is missing, truncated, corrupt or tampered with."""


class ConfigError(AutocompressError):
    """An experiment file or setting that fails validation."""
