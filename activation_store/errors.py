"""The one base class of featureatlas's user-facing errors.

Every error that a user can cause and fix (a bad flag, a missing file, a mismatched store, a resume
with other settings) derives from `FeatureAtlasError`, and its message names the problem and the fix.
The command line catches this type alone: anything else is an internal bug and keeps its traceback.
Subclasses also derive from the builtin type that fits (ValueError, FileNotFoundError, ...), so
callers that caught those before keep working.
"""
from __future__ import annotations


class FeatureAtlasError(Exception):
    """A mistake the user can fix; the message says how."""


class ConfigError(FeatureAtlasError, ValueError):
    """A setting is unknown, out of range or inconsistent with another."""


class RunError(FeatureAtlasError, ValueError):
    """A run directory cannot be used as asked (exists, unwritable, resumed with other settings, ...)."""
