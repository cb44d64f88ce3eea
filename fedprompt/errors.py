"""Errors of fedprompt's boundaries, importable without torch (the Flower relay path needs them)."""


class PayloadError(ValueError):
    """A payload that was rejected on arrival; the message says which part is wrong and how."""
