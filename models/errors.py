"""Errors raised by `models`, each naming its cause."""


class ModelError(Exception):
    """Base class for errors about models, their files and their inputs."""


class UnknownModelError(ModelError, KeyError):
    """A short name that is not in the registry and is not a path."""

    def __str__(self) -> str:  # KeyError would print the repr
        return str(self.args[0])


class ModelFileError(ModelError):
    """A missing, corrupt or truncated model file, or one whose contents do not match its config."""


class UnsupportedModelError(ModelError):
    """An architecture, quantisation or option this package does not implement."""


class InputError(ModelError, ValueError):
    """Input of the wrong shape, or longer than the model's context."""


class InsufficientMemoryError(ModelError, MemoryError):
    """Loading would need more memory than the host or a device has free (both numbers in the message)."""
