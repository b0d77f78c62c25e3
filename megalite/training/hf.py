"""Hugging Face at either end of a run: ``--init-from-hf`` starts from a ``save_pretrained``
directory in any layout and schedule, ``--export-hf`` writes the trained model back.

:func:`megalite.models.from_hf` builds the GPT of one stage per pipeline rank. A schedule
may give a rank several stages (interleaved, zbv): :func:`gpt_from_hf` builds the rank's
model as training does and fills each of its stages from ``from_hf`` seen as that stage
alone (a pipeline of ``num_stages`` ranks, this rank at that stage), so each stage's tensors
are read once, only by the ranks that hold it.
"""
from __future__ import annotations

import dataclasses
import os
import shutil

import torch

from megalite.models import GPT, GPTConfig, from_hf
from megalite.parallel.state import ParallelState

# GPTConfig fields the run decides, not the HF directory.
_RUN_FIELDS = ("sequence_parallel", "kernels", "dropout", "recompute", "recompute_layers")


def gpt_from_hf(directory: str, cfg: GPTConfig, ps: ParallelState, stages: list[int],
                num_stages: int) -> GPT:
    """This rank's ``stages`` (of ``num_stages``) of ``cfg``'s GPT with the weights of the
    Hugging Face directory (whose config.json gave ``cfg``). Not collective."""
    model = GPT(cfg, ps, stages=stages, num_stages=num_stages)
    params = dict(model.named_parameters())
    run_fields = {k: getattr(cfg, k) for k in _RUN_FIELDS}
    for stage in stages:
        alone = dataclasses.replace(ps, pp=num_stages, pp_rank=stage)
        part = from_hf(directory, state=alone, **run_fields)
        with torch.no_grad():
            for name, param in part.named_parameters():
                params[name].copy_(param)
    return model


def copy_tokenizer_files(source: str, directory: str) -> list[str]:
    """Copy the tokenizer files of an HF directory (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, tokenizer.model, vocab/merges files) into ``directory``, so an
    exported model loads with its tokenizer. Returns the names copied."""
    names = [n for n in sorted(os.listdir(source))
             if n.startswith(("tokenizer", "special_tokens_map", "vocab.", "merges."))]
    for name in names:
        shutil.copy2(os.path.join(source, name), os.path.join(directory, name))
    return names
