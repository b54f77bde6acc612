"""Error types. Every one is a ``ValueError`` so callers that catch ``ValueError`` keep working;
the CLI turns each into a one-line message and exit code 2."""


class AdvmendError(ValueError):
    """Base class of every error advmend raises on purpose (bad input, config, data, checkpoint)."""


class InputError(AdvmendError):
    """A tensor given to a public function has the wrong shape, dtype, range or values."""


class ConfigError(AdvmendError):
    """A configuration key, value or type is invalid; the message names the dotted path."""


class DataError(AdvmendError):
    """A data set is missing or malformed; the message names the path and how to fix it."""


class CheckpointError(AdvmendError):
    """A checkpoint is missing, corrupt, tampered with, or does not match the model."""


class ModelContractError(AdvmendError):
    """A model does not honour the contract: [0,1] images in, one (N, K) logits tensor out."""


class PathError(AdvmendError):
    """A path the file system refuses: a name too long, no permission, a read-only file system, a file where
    a folder must be. The message names the path and what to do."""
