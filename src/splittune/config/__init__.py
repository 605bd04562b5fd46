"""The run configuration: YAML validated by pydantic, overridable key by key with ``--set``.

Every section forbids unknown keys, so a typo is an error that names the key and the allowed ones instead of a
silently ignored setting. ``base`` (errors, warnings, the section base), ``sections`` (each section), ``run``
(``RunConfig``), ``load`` (files, overrides, messages, dumps)."""

from .base import ConfigError, Section, SplittuneDeprecationWarning, SplittuneWarning, warn
from .load import apply_override, dump_config, load_config, public_fields, validate
from .run import RunConfig
from .sections import (ALLOWED_CODECS, DEFENSE_NAMES, SIZE_UNITS, CacheConfig, ClientData, ClientLora, ClientOverride,
                       CodecConfig, DataConfig, Defense, DpSgdConfig, LinkConfig, LoraConfig, Partition, Schedule,
                       QuantizeConfig, SegmentName, SegmentsConfig,
                       TrainConfig, TrainMode, default_cuts, parse_size)

__all__ = [
    "ALLOWED_CODECS", "DEFENSE_NAMES", "SIZE_UNITS", "CacheConfig", "ClientData", "ClientLora", "ClientOverride",
    "CodecConfig", "ConfigError", "DataConfig", "Defense", "DpSgdConfig", "LinkConfig", "LoraConfig", "Partition", "RunConfig", "Schedule", "Section",
    "QuantizeConfig", "SegmentName", "SegmentsConfig", "SplittuneDeprecationWarning", "SplittuneWarning", "TrainConfig", "TrainMode",
    "apply_override", "default_cuts", "dump_config", "load_config", "parse_size", "public_fields", "validate", "warn",
]
