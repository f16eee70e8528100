"""Errors that lisa_core raises on purpose (bad input, a cancelled query), so callers can tell them from bugs."""


class LisaError(Exception):
    """Base class of every error lisa_core raises on purpose."""


class InputError(LisaError, ValueError):
    """An image or a query that cannot be used; the message names what is wrong."""


class CheckpointError(LisaError):
    """A model folder that cannot be loaded; the message names the file and, where known, the key."""


class ConfigurationError(LisaError, ValueError):
    """A device, precision or option that this installation cannot provide."""


class GenerationCancelled(LisaError):
    """A caller's progress or token callback asked to stop; `tokens_generated` were produced by then."""

    def __init__(self, tokens_generated: int) -> None:
        super().__init__(f"generation cancelled after {tokens_generated} tokens")
        self.tokens_generated = tokens_generated
