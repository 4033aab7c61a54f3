"""The one error of the quantize package."""


class QuantizeError(ValueError):
    """A quantisation scheme or model that cannot be used; the message says what to do."""
