"""Exceptions that mean "the input is wrong" (the command line exits 2 on them), not "we failed"."""


class FastSAM3DInputError(ValueError):
    """Bad input from the user: the message names the file or field and what was expected."""


class CheckpointError(FastSAM3DInputError):
    """A checkpoint file that cannot be loaded safely or does not match a known architecture."""


class ImageError(FastSAM3DInputError):
    """An image that cannot be segmented (unreadable, wrong dimension, non-finite, constant, ...)."""


class PromptError(FastSAM3DInputError):
    """A click or box that cannot be used (outside the image, wrong format, ...)."""
