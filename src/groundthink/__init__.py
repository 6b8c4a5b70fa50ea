"""GroundThink: hybrid Gated DeltaNet + sliding-window attention language models."""

from .config import ConfigError, GroundThinkConfig
from .model import GroundThinkLM, LMOutput

__version__ = "0.1.0"
__all__ = ["ConfigError", "GroundThinkConfig", "GroundThinkLM", "LMOutput", "__version__"]
