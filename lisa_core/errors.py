"""Errors that lisa_core raises on bad input, so callers can tell them from bugs."""


class LisaError(Exception):
    """Base class of every error lisa_core raises on purpose."""


class InputError(LisaError, ValueError):
    """An image or a query that cannot be used; the message names what is wrong."""


class CheckpointError(LisaError):
    """A model folder that cannot be loaded; the message names the file and, where known, the key."""


class ConfigurationError(LisaError, ValueError):
    """A device, precision or option that this installation cannot provide."""
