"""Data: sources (builtin texts, local files, hub datasets) → records → tokenized examples → batches.

``build_task(cfg.data, tokenizer, cfg.train.seq_len, cfg.seed)`` is the entry point; ``TaskData.collate``
and ``ResumableBatchSampler`` turn its examples into reproducible micro-batches. With several clients,
``build_client_tasks(cfg, tokenizer)`` gives each its share (``partition_records``) and ``merge_tasks`` pools them.
"""

from .builtin import BUILTIN_SOURCES
from .causal_lm import pack
from .choices import ChoiceEval, choice_accuracy
from .collate import collate, pad_token_id
from .errors import DataError
from .instruction import IGNORE_INDEX, InstructionFormat
from .partition import build_client_tasks, merge_tasks, partition_records
from .records import Record, normalize_record, record_kind
from .sampler import ResumableBatchSampler
from .sources import load_records
from .task import TaskData, build_task, build_task_from_records, resolve_kind

__all__ = [
    "BUILTIN_SOURCES",
    "IGNORE_INDEX",
    "ChoiceEval",
    "DataError",
    "InstructionFormat",
    "Record",
    "ResumableBatchSampler",
    "TaskData",
    "build_client_tasks",
    "build_task",
    "build_task_from_records",
    "choice_accuracy",
    "collate",
    "load_records",
    "merge_tasks",
    "normalize_record",
    "pack",
    "pad_token_id",
    "partition_records",
    "record_kind",
    "resolve_kind",
]
