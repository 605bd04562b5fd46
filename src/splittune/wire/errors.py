"""The one error a receiver sees for a frame it cannot use (codecs and frames both raise it)."""


class FrameError(ValueError):
    """A frame that cannot be decoded; the message says which field is wrong."""
