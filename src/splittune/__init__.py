"""splittune: split-learning fine-tuning of large language models.

The Python API (``api.py``) loads on first use, so importing a part of splittune does not import every other:

    import splittune
    summary = splittune.train("examples/defended.yaml", out="runs/defended")
"""

from .version import __version__

API = ("train", "configure")


def __getattr__(name: str):
    if name in API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'splittune' has no attribute {name!r}")


__all__ = ["__version__", *API]
