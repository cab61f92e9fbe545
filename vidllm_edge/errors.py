"""Typed errors with the project's message format.

Every user-facing error reads ``subject | what happened`` and, on the next line, ``Note: how to fix``.
The CLI turns any :class:`VidLLMError` into that message on stderr and exit code 2.
"""

from __future__ import annotations


class VidLLMError(Exception):
    """Base class of every error a user can cause (bad input, bad files, bad flags)."""

    def __init__(self, subject: str, problem: str, note: str = "") -> None:
        self.subject = subject
        self.problem = problem
        self.note = note
        message = f"{subject} | {problem}"
        if note:
            message += f"\nNote: {note}"
        super().__init__(message)


class InputError(VidLLMError):
    """A tensor, frame or argument does not have the shape, type or value expected."""


class VideoError(VidLLMError):
    """A video source cannot be opened or decoded."""


class CheckpointError(VidLLMError):
    """A checkpoint is missing, truncated, or its keys/shapes do not match the model."""


class ConfigError(VidLLMError):
    """A configuration or preset is unknown or inconsistent."""


class OutputError(VidLLMError):
    """An output location cannot be written."""


class DependencyError(VidLLMError):
    """An optional dependency that the requested feature needs is not installed."""
