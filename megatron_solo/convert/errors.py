"""Errors of the conversion: a bad input or a failed check, with a message that says what and where."""

from megatron_solo.errors import UserError


class ConversionError(UserError):
    """Bad input or a failed check: the message says what and where (one ``error:`` line, exit 1)."""


class VerificationError(ConversionError):
    """``--verify`` found a mismatch between the source and the converted model."""
