"""Exceptions raised by the core: one class per kind of bad input."""

from __future__ import annotations


class PayloadError(ValueError):
    """A payload (usually bytes from the network) is malformed or does not match the model.

    The message always says what was expected and what was found, so the server can log it next to the
    sender's node id and drop the reply.
    """


class ConfigError(ValueError):
    """A configuration key is unknown or its value is out of range; the message names the key."""
