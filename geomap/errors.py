"""Errors that geomap raises for bad input; each message names the problem and how to fix it."""


class GeomapError(Exception):
    """Base class of every error geomap raises on purpose.

    Attributes:
        http_status: The HTTP status ``geomap serve`` answers this error with (subclasses set their own).
    """

    http_status: int = 400


class ModelNotFoundError(GeomapError):
    """A model name, directory or hub id could not be resolved to weights on this machine."""


class UnsupportedArchitectureError(GeomapError):
    """The model's ``config.model_type`` is not in the architecture registry."""


class PromptError(GeomapError):
    """A prompt cannot be captured (empty, too long, undecodable)."""
