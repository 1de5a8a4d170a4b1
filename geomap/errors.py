"""Errors that geomap raises for bad input; each message names the problem and how to fix it."""


class GeomapError(Exception):
    """Base class of every error geomap raises on purpose."""


class ModelNotFoundError(GeomapError):
    """A model name, directory or hub id could not be resolved to weights on this machine."""


class UnsupportedArchitectureError(GeomapError):
    """The model's ``config.model_type`` is not in the architecture registry."""


class PromptError(GeomapError):
    """A prompt cannot be captured (empty, too long, undecodable)."""
