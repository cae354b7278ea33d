"""Errors of the conversion: a bad input or a failed check, with a message that says what and where."""


class ConversionError(RuntimeError):
    """Bad input or a failed check: the message says what and where."""


class VerificationError(ConversionError):
    """``--verify`` found a mismatch between the source and the converted model."""
