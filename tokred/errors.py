"""Exceptions raised by tokred. All are raised at ``apply`` time, never in the middle of a forward."""


class TokredError(Exception):
    """Base class of every error tokred raises on purpose."""


class UnknownMethodError(TokredError, KeyError):
    """A method name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would otherwise print the message quoted
        return str(self.args[0])


class UnknownTaskError(TokredError, KeyError):
    """A task name that is not in the registry."""

    def __str__(self) -> str:
        return str(self.args[0])


class InvalidOptionError(TokredError, ValueError):
    """An option that a method does not have, or a value outside its valid range."""


class UnsupportedModelError(TokredError, TypeError):
    """A model that no adapter (or not the chosen method) supports."""
