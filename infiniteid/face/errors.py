"""Exceptions and warnings of the face front end.

A user mistake (wrong model folder, unreadable photo, no face in it) must end
in one of these, with a message that says what to do, never in a traceback
from deep inside insightface, OpenCV or onnxruntime. All errors derive from
:class:`FaceError`, so a server can map them to one per-request error.
"""
from __future__ import annotations


class FaceError(Exception):
    """Base class of every error the face front end raises on purpose."""


class FaceModelsError(FaceError):
    """The insightface model folder is missing, incomplete or unreadable.

    Nothing is ever downloaded in its place: the message says which files to
    put where.
    """


class FaceDependencyError(FaceError, ImportError):
    """insightface (or one of the modules it imports) is not installed."""


class FaceImageError(FaceError, ValueError):
    """The image cannot be used: unreadable, wrong type or shape, too small."""


class NoFaceError(FaceError):
    """The detector found no face in the image."""


class MultipleFacesWarning(UserWarning):
    """Several faces were found; the largest one was used."""
