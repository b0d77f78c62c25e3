"""Hugging Face at either end of a run: ``--init-from-hf`` starts from a ``save_pretrained``
directory in any layout and schedule, ``--export-hf`` writes the trained model back.

:func:`gpt_from_hf` builds the rank's stages (several under interleaved or zbv schedules)
with :func:`megalite.models.from_hf`, which reads only those stages' tensors.
"""
from __future__ import annotations

import json
import os
import shutil

from megalite.models import GPT, GPTConfig, from_hf
from megalite.parallel.state import ParallelState

# GPTConfig fields the run decides, not the HF directory.
_RUN_FIELDS = ("sequence_parallel", "kernels", "dropout", "recompute", "recompute_layers",
               "moe_aux_loss_coeff", "moe_z_loss_coeff")  # MoE coefficients: --moe-*-coeff


def gpt_from_hf(directory: str, cfg: GPTConfig, ps: ParallelState, stages: list[int],
                num_stages: int) -> GPT:
    """This rank's ``stages`` (of ``num_stages``) of ``cfg``'s GPT with the weights of the
    Hugging Face directory (whose config.json gave ``cfg``). Not collective."""
    return from_hf(directory, state=ps, stages=stages, num_stages=num_stages,
                   **{k: getattr(cfg, k) for k in _RUN_FIELDS})


def hf_model_type(directory: str) -> str:
    """The ``model_type`` of an HF directory's config.json (llama, qwen3, ...)."""
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)["model_type"]


def copy_tokenizer_files(source: str, directory: str) -> list[str]:
    """Copy the tokenizer files of an HF directory (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, tokenizer.model, vocab/merges files) into ``directory``, so an
    exported model loads with its tokenizer. Returns the names copied."""
    names = [n for n in sorted(os.listdir(source))
             if n.startswith(("tokenizer", "special_tokens_map", "vocab.", "merges."))]
    for name in names:
        shutil.copy2(os.path.join(source, name), os.path.join(directory, name))
    return names
