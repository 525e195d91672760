"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class AmocError(Exception):
    """A problem the user can fix (bad input, missing file); never a bug."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line on the terminal, whatever user-supplied text the message quotes.
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class ConfigError(AmocError):
    """A params value that is unknown, of the wrong type or out of range."""


class DataError(AmocError):
    """A data source that is missing, corrupt, unsafe or fails its checksum."""


class CheckpointError(AmocError):
    """A checkpoint that is missing, truncated, of the wrong format or unsafe."""


class NumericalError(AmocError):
    """A NaN or inf in a loss or in the weights."""

    exit_code = 3


class LockedError(AmocError):
    """Another run holds the output folder."""
