"""Exceptions that name what went wrong and where, so a user can act on them."""


class ClipzooError(Exception):
    """Base class of every error clipzoo raises on purpose."""


class MissingPackageError(ClipzooError, LookupError):
    """A config names a part that lives in a clipzoo package which is not installed."""


class UnknownPartError(ClipzooError, LookupError):
    """A name that no installed package registers."""


class ModelFolderError(ClipzooError, ValueError):
    """A model folder is incomplete, inconsistent or holds a format clipzoo refuses."""


class ConfigError(ClipzooError, ValueError):
    """A configuration value is missing or malformed."""
