"""Stage 8 (evaluate): held-out loss, perplexity and, for labelled data, label-word accuracy."""

from .evaluate import evaluate

__all__ = ["evaluate"]
