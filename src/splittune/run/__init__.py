"""A run: assembled (``assemble``), resumed (``resume``), looped (``loop``), summed up (``summary``), its adapters
written (``adapters``). ``train`` runs every party in this process (or its clients on Ray workers: ``ray_clients``);
``train_remote`` is one client process of a deployed run."""

from .adapters import ADAPTERS, save_adapters
from .assemble import Fleet, build, client_secret, client_tasks, connect, parallel
from .loop import Loop, resolved, train_batch
from .remote import train_remote
from .resume import CHECKPOINTS, STOP, Interrupted
from .start import train
from .summary import BREAKDOWN, time_breakdown

__all__ = ["ADAPTERS", "BREAKDOWN", "CHECKPOINTS", "STOP", "Fleet", "Interrupted", "Loop", "build", "client_secret",
           "client_tasks", "connect", "parallel", "resolved", "save_adapters", "time_breakdown", "train", "train_batch",
           "train_remote"]
