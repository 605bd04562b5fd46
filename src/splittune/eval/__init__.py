"""Stage 8 (evaluate): held-out loss, perplexity and, for labelled data, label-word accuracy (evaluate.py); generated
answers scored against references (tasks.py, for ``splittune evaluate``; generative.py, during training; page.py,
``eval.html``)."""

from .evaluate import evaluate

__all__ = ["evaluate"]
