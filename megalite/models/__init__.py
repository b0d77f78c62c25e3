"""GPT models built only from megalite's parallel layers."""
from megalite.models.config import GPTConfig, PRESETS
from megalite.models.gpt import GPT

__all__ = ["GPTConfig", "PRESETS", "GPT"]
