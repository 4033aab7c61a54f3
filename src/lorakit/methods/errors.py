"""The error every method raises for a choice that cannot work (a ValueError: the CLI prints
its message as one line)."""


class MethodError(ValueError):
    """A fine-tuning method does not fit this model, task or option."""
