"""The trainer as a library: a model of one's own (examples/custom_lm.py) and a GPT started
from a Hugging Face directory train at tp=2, pp=2 exactly as in one process, resume exactly,
and export; a data set that does not fit the HF model is refused before anything starts.

The single-process references run in the test process; every 4-process run shares one world.
"""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from safetensors.torch import load_file

from megalite.training import Trainer, UsageError, check_args, parse_args
from world import run_world

# Imported where used: the world's processes import this file and need not load it.
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="needs transformers")

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("custom_lm", ROOT / "examples" / "custom_lm.py")
custom_lm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(custom_lm)

COMMON = ["--seq-len", "32", "--global-batch-size", "8", "--micro-batch-size", "2",
          "--log-interval", "1", "--seed", "3", "--warmup", "1"]
# Adam moves a weight by about lr whatever its gradient's size, so a gradient that rounds
# differently in two layouts can move a weight by up to ~lr apart: the weights are compared
# (<= 1e-5) after training at this small a rate.
HF_LR = ("--lr", "3e-4")


def hf_llama(directory: Path) -> Path:
    """A tiny random Llama (byte vocabulary, so the bundled corpus fits) saved to disk."""
    import transformers
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
    return directory


def train(cwd: Path, *flags, custom=False) -> int:
    """One run of the trainer in this process's world, its paths relative to ``cwd``."""
    here = os.getcwd()
    os.chdir(cwd)
    try:
        if custom:
            args = parse_args(COMMON + list(flags), defaults=custom_lm.DEFAULTS)
            build = lambda ps, stages, n: custom_lm.TinyLM(ps, stages, n, seed=args.seed)  # noqa
            return Trainer(args, model_provider=build).run()
        return Trainer(parse_args(COMMON + list(flags))).run()
    finally:
        os.chdir(here)


def losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def _runs_at_tp2_pp2(rank, world_size, cwd, hf):
    cwd = Path(cwd)
    tp2pp2 = ["--tp", "2", "--pp", "2", "--steps", "3"]
    # A model of one's own: saved every step, then resumed from step 1 in the same layout.
    assert train(cwd, *tp2pp2, "--save", "custom", "--save-every", "1",
                 "--metrics-out", "custom4.jsonl", custom=True) == 0
    assert train(cwd, *tp2pp2, "--load", "custom/step_00000001",
                 "--metrics-out", "custom4_resumed.jsonl", custom=True) == 0
    # From HF, two stages per rank; stopped after step 2 and run again: it resumes from its
    # own checkpoint (the HF weights again would change step 3), then exports.
    hf_run = [*tp2pp2, *HF_LR, "--init-from-hf", hf, "--schedule", "interleaved-1f1b", "--save",
              "hf_ckpt", "--export-hf", "hf4_out", "--metrics-out", "hf4.jsonl"]
    assert train(cwd, *hf_run, "--exit-after", "2") == 0
    assert not (cwd / "hf4_out").exists()  # stopped before --steps: nothing exported
    assert train(cwd, *hf_run) == 0
    # At learning rate 0 the export gives back the imported weights (through both shardings).
    assert train(cwd, "--tp", "2", "--pp", "2", "--steps", "1", "--lr", "0",
                 "--init-from-hf", hf, "--export-hf", "lr0_out") == 0


@needs_transformers
def test_custom_model_and_hf_start_at_tp2_pp2_equal_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGALITE_DEVICE", "cpu")
    hf = str(hf_llama(tmp_path / "hf"))
    assert train(tmp_path, "--steps", "3", "--metrics-out", "custom1.jsonl", custom=True) == 0
    assert train(tmp_path, "--steps", "3", *HF_LR, "--init-from-hf", hf, "--export-hf", "hf1_out",
                 "--metrics-out", "hf1.jsonl") == 0
    run_world(4, _runs_at_tp2_pp2, str(tmp_path), hf, timeout=400)

    single = losses(tmp_path / "custom1.jsonl")
    assert single[3] < single[1]
    tp2pp2 = losses(tmp_path / "custom4.jsonl")
    assert tp2pp2.keys() == single.keys() and \
        all(abs(tp2pp2[s] - single[s]) <= 1e-5 for s in single), (tp2pp2, single)
    assert losses(tmp_path / "custom4_resumed.jsonl") == {s: tp2pp2[s] for s in (2, 3)}
    meta = json.loads((tmp_path / "custom" / "step_00000003" / "meta.json").read_text())
    assert meta["config"] == {"vocab": 256, "d": 128, "heads": 4, "layers": 4,
                              "max_seq_len": 256, "seed": 3}

    single, tp2pp2 = losses(tmp_path / "hf1.jsonl"), losses(tmp_path / "hf4.jsonl")
    assert tp2pp2.keys() == single.keys() == {1, 2, 3}
    assert all(abs(tp2pp2[s] - single[s]) <= 1e-5 for s in single), (tp2pp2, single)
    one, four = (load_file(tmp_path / d / "model.safetensors") for d in ("hf1_out", "hf4_out"))
    imported = load_file(tmp_path / "hf" / "model.safetensors")
    assert one.keys() == four.keys() == imported.keys()
    assert all((one[k] - four[k]).abs().max() <= 1e-5 for k in one)
    assert all((one[k] - imported[k]).abs().max() > 1e-4 for k in one)  # it did train
    lr0 = load_file(tmp_path / "lr0_out" / "model.safetensors")
    assert all(torch.equal(lr0[k], imported[k]) for k in imported)
    # The exported directory is a model transformers loads.
    import transformers
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf4_out")
    assert torch.equal(model.lm_head.weight.detach(), four["lm_head.weight"])


@needs_transformers
def test_data_that_does_not_fit_the_hf_model_is_refused(tmp_path):
    hf = hf_llama(tmp_path / "hf")
    for name, vocab, tokenizer in (("wide", 300, "byte"), ("other", 256, f"hf:{tmp_path}/tok")):
        np.zeros(1000, dtype=np.uint16).tofile(tmp_path / f"{name}.bin")
        (tmp_path / f"{name}.json").write_text(json.dumps({
            "format": "megalite-tokens", "version": 1, "dtype": "uint16", "num_tokens": 1000,
            "vocab_size": vocab, "tokenizer": tokenizer}))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"model": "one"}')
    (hf / "tokenizer.json").write_text('{"model": "another"}')
    small = ["--seq-len", "16", "--global-batch-size", "4"]
    for flags, message in (
            (["--data", str(tmp_path / "wide")], f"the data's tokenizer has 300 tokens but "
                                                 f"--init-from-hf {hf} only 256"),
            (["--data", str(tmp_path / "other")], f"--data was tokenized with hf:{tmp_path}/tok"
                                                  f", whose tokenizer.json differs from "
                                                  f"--init-from-hf {hf}'s"),
            (["--model", "tiny"], "--model tiny and --init-from-hf"),
            (["--seq-len", "128"], "--seq-len 128 exceeds the HF model's max_seq_len 64")):
        with pytest.raises(UsageError) as error:  # before any process group
            check_args(parse_args(["--init-from-hf", str(hf), *small, *flags]), world_size=1)
        assert message in str(error.value)
