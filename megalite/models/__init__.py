"""GPT models built only from megalite's parallel layers, and Hugging Face conversion."""
from megalite.models.config import GPTConfig, PRESETS
from megalite.models.gpt import GPT, HeadInput
from megalite.models.hf import from_hf, gpt_config_from_hf, hf_config_from_gpt, save_hf

__all__ = ["GPTConfig", "PRESETS", "GPT", "HeadInput", "from_hf", "save_hf", "gpt_config_from_hf",
           "hf_config_from_gpt"]
