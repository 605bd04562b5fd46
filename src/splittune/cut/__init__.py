"""The cut: everything that crosses it goes party → link → chain → channel → chain → link → party."""

from .chain import RAW_TERMS, Chain, check_terms, terms_from
from .link import CutLink, Pending, ServerLink
from .transforms import TRANSFORMS, ChainError

__all__ = ["RAW_TERMS", "Chain", "check_terms", "terms_from", "CutLink", "Pending", "ServerLink", "TRANSFORMS", "ChainError"]
