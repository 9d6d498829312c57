"""Exceptions raised by tokred (all at ``apply`` time, never in the middle of a forward), and the base class of its
warnings (issued while the model runs, when a method reduces nothing for a reason the user can fix)."""


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


class TokredWarning(UserWarning):
    """Base class of every warning tokred issues on purpose (e.g. options that reduce nothing on these inputs)."""
