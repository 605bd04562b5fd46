"""Stage 0 chosen for you: ``splittune plan`` profiles the model on this machine, predicts every choice of
cuts, codecs, micro-batches and gradient checkpointing, and ranks those that fit the parties' memory.

``profile_model`` (``profile.py``, or ``estimate.py`` from the config alone), ``predict`` (``cost.py``) and
``search`` (``search.py``) are the API the benchmark calls too.
"""

from .cost import Prediction, predict
from .profile import Fit, Profile, profile_model
from .search import BudgetError, Choice, PlanResult, Ranked, search

__all__ = ["BudgetError", "Choice", "Fit", "PlanResult", "Prediction", "Profile", "Ranked", "predict", "profile_model", "search"]
