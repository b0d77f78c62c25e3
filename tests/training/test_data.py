"""Tokenizers, preprocessing, TokenDataset and ShardedSampler (all in-process, no downloads)."""
import gzip
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megalite.training.data import (ShardedSampler, TokenDataset, default_corpus_path,
                                    get_batch, read_metadata)
from megalite.training.preprocess import preprocess
from megalite.training.tokenizer import ByteTokenizer, get_tokenizer


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("byte")
    text = "Hello, wörld! ∑ 日本語 🙂\n\ttab"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids) and tok.vocab_size == 256 and tok.eos_id == 0
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text  # tensors of ids work too
    assert tok.decode([0xE6]) == "\ufffd"  # half a character decodes, does not raise
    with pytest.raises(ValueError, match="256"):
        tok.decode([300])


def test_unknown_spec_and_missing_library(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="byte"):
        get_tokenizer("sentencepiece:foo")
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # makes `import tiktoken` fail
    with pytest.raises(ImportError, match="pip install tiktoken"):
        get_tokenizer("tiktoken:cl100k_base")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_tokenizer(f"hf:{tmp_path / 'nope'}")


def test_tiktoken_never_downloads(monkeypatch, tmp_path):
    pytest.importorskip("tiktoken")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    with pytest.raises(FileNotFoundError, match="TIKTOKEN_CACHE_DIR"):
        get_tokenizer("tiktoken:cl100k_base")


def _train_tiny_bpe(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "the dog ate the cat food"] * 20,
                            trainer)
    path = tmp_path / "tok"
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    return tok, path


def test_hf_tokenizer_adapter(tmp_path):
    raw, path = _train_tiny_bpe(tmp_path)
    text = "the cat ate the mat"
    for spec in (f"hf:{path / 'tokenizer.json'}", f"hf:{path}"):
        tok = get_tokenizer(spec)
        assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
        ids = tok.encode(text)
        assert ids == raw.encode(text).ids and len(ids) < len(text)  # merges were used
        assert tok.decode(ids) == text
        # No tokenizer_config.json says which token is eos: it is found by its usual name.
        assert tok.eos_id == raw.token_to_id("</s>")


def test_hf_tokenizer_from_transformers_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    raw, path = _train_tiny_bpe(tmp_path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>")
    fast.save_pretrained(str(tmp_path / "saved"))
    tok = get_tokenizer(f"hf:{tmp_path / 'saved'}")
    assert tok.eos_id == raw.token_to_id("</s>")
    assert tok.decode(tok.encode("the dog sat")) == "the dog sat"


# ---------------------------------------------------------------- preprocessing

def test_preprocess_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("héllo\n\nworld", encoding="utf-8")
    (tmp_path / "b.txt").write_text("xyz", encoding="utf-8")
    docs = ["first doc", "second ∑"]
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)) + "\n")
    meta = preprocess([str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl")],
                      str(tmp_path / "out" / "corpus"), "byte", text_key="body",
                      append_eos=True)
    texts = ["héllo\n\nworld", "xyz"] + docs  # globs sorted; a .txt is one document
    expected = [t for text in texts for t in list(text.encode()) + [0]]
    assert meta["num_documents"] == 4 and meta["num_tokens"] == len(expected)
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "byte"
    assert read_metadata(tmp_path / "out" / "corpus.bin") == meta
    stored = np.fromfile(tmp_path / "out" / "corpus.bin", dtype=np.uint16)
    assert stored.tolist() == expected


def test_preprocess_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*--text-key"):
        preprocess([str(tmp_path / "bad.jsonl")], str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        preprocess([str(tmp_path / "*.txt")], str(tmp_path / "o"))


class _BigVocab(ByteTokenizer):
    spec, vocab_size = "big", 70000  # ids stay bytes; only the dtype choice changes


def test_preprocess_dtype_choice(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    assert preprocess([str(tmp_path / "a.txt")], str(tmp_path / "s"))["dtype"] == "uint16"
    meta = preprocess([str(tmp_path / "a.txt")], str(tmp_path / "b"), _BigVocab())
    assert meta["dtype"] == "uint32"
    assert (tmp_path / "b.bin").stat().st_size == 3 * 4
    ds = TokenDataset(tmp_path / "b", seq_len=2)
    assert ds[0][0].tolist() == [97, 98] and ds[0][1].tolist() == [98, 99]


def test_preprocess_command_line(tmp_path):
    (tmp_path / "a.txt").write_text("command line text")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"content": f"doc {i}"}) + "\n" for i in range(50))
    out = subprocess.run([sys.executable, "-m", "megalite.training.preprocess", "--input",
                          str(tmp_path / "a.txt"), str(tmp_path / "*.jsonl.gz"), "--json-key",
                          "content", "--workers", "2", "--output", str(tmp_path / "cli")],
                         capture_output=True, text=True, check=True).stdout
    docs = ["command line text"] + [f"doc {i}" for i in range(50)]
    assert f"{sum(map(len, docs))} tokens" in out and "51 documents" in out
    assert "MB/s" in out and "2 worker(s)" in out
    assert bytes(np.fromfile(tmp_path / "cli.bin", np.uint16).astype(np.uint8)).decode() == \
        "".join(docs)


# ---------------------------------------------------------------- dataset

def _token_file(tmp_path, n):
    """A byte-level token file holding tokens 0..n-1 (mod 256)."""
    meta = {"format": "megalite-tokens", "version": 1, "dtype": "uint16", "num_tokens": n,
            "num_documents": 1, "tokenizer": "byte", "vocab_size": 256, "eos_id": 0}
    (np.arange(n) % 256).astype(np.uint16).tofile(tmp_path / "t.bin")
    (tmp_path / "t.json").write_text(json.dumps(meta))
    return tmp_path / "t"


def test_dataset_windows_and_shift(tmp_path):
    ds = TokenDataset(_token_file(tmp_path, 23), seq_len=5)
    assert len(ds) == 4  # (23 - 1) // 5
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (5,)
        assert x.tolist() == list(range(5 * i, 5 * i + 5))
        assert y.tolist() == list(range(5 * i + 1, 5 * i + 6))
    with pytest.raises(IndexError):
        ds[4]
    x, y = get_batch(ds, [3, 0])
    assert x.shape == (2, 5) and x[0, 0] == 15 and y[1, -1] == 5
    clone = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive
    assert isinstance(clone.tokens, np.memmap) and clone[2][1].tolist() == ds[2][1].tolist()
    assert len(TokenDataset(_token_file(tmp_path, 21), seq_len=5)) == 4  # exact fit


def test_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.bin.*megalite\.training\.preprocess"):
        TokenDataset(tmp_path / "missing", seq_len=4)
    prefix = _token_file(tmp_path, 10)
    with pytest.raises(ValueError, match="too few for one sample"):
        TokenDataset(prefix, seq_len=10)
    meta = json.loads((tmp_path / "t.json").read_text())
    (tmp_path / "t.json").write_text(json.dumps({**meta, "num_tokens": 11}))
    with pytest.raises(ValueError, match="truncated or mismatched"):
        TokenDataset(prefix, seq_len=4)
    (tmp_path / "t.json").write_text('{"dtype": "uint16", "num_tok')
    with pytest.raises(ValueError, match="corrupt token metadata"):
        TokenDataset(prefix, seq_len=4)


def test_bundled_corpus():
    ds = TokenDataset(default_corpus_path(), seq_len=256)
    assert ds.meta["tokenizer"] == "byte" and ds.vocab_size == 256
    assert len(ds) > 3000  # ~1 MB of text
    raw = Path(default_corpus_path() + ".txt").read_bytes()
    assert bytes(ds.tokens.astype(np.uint8)) == raw  # the .bin is exactly the .txt's bytes
    assert "Zen of Python" in get_tokenizer("byte").decode(ds[0][0].tolist())


# ---------------------------------------------------------------- sampler

def _steps(sampler, n):
    return [sampler.next_batch_indices() for _ in range(n)]


def test_sampler_deterministic_and_dp_invariant():
    n, gbs, steps = 50, 8, 15  # 6 steps per epoch: crosses two epoch boundaries
    ref = _steps(ShardedSampler(n, gbs, seed=3), steps)
    assert ref == _steps(ShardedSampler(n, gbs, seed=3), steps)
    assert ref != _steps(ShardedSampler(n, gbs, seed=4), steps)
    for dp in (2, 4):
        ranks = [_steps(ShardedSampler(n, gbs, d, dp, seed=3), steps) for d in range(dp)]
        for step in range(steps):
            shards = [ranks[d][step] for d in range(dp)]
            assert all(len(s) == gbs // dp for s in shards)
            assert sum(shards, []) == ref[step]  # contiguous slices, in dp-rank order


def test_sampler_epochs():
    n, gbs = 50, 8
    s = ShardedSampler(n, gbs, seed=0)
    epochs = [sum(_steps(s, s.steps_per_epoch), []) for _ in range(3)]
    for e in epochs:
        assert len(e) == len(set(e)) == 48  # no repeats; the 2-sample tail is dropped
        assert set(e) <= set(range(n))
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    assert s.epoch == 3 and s.offset == 0 and s.consumed_samples == 3 * 48


@pytest.mark.parametrize("dp_before,dp_after", [(1, 1), (2, 4), (4, 1)])
def test_sampler_resume(dp_before, dp_after):
    n, gbs, seed, total = 37, 4, 11, 25  # 9 steps per epoch
    full = _steps(ShardedSampler(n, gbs, seed=seed), total)
    for cut in (0, 5, 9, 13):
        first = ShardedSampler(n, gbs, 0, dp_before, seed)
        _steps(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
        after = [ShardedSampler(n, gbs, d, dp_after, seed) for d in range(dp_after)]
        for s in after:
            s.load_state_dict(state)
        for step in range(cut, total):
            assert sum((s.next_batch_indices() for s in after), []) == full[step]


def test_sampler_errors():
    with pytest.raises(ValueError, match="multiple of dp_size"):
        ShardedSampler(100, 6, 0, 4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedSampler(5, 8)
    with pytest.raises(ValueError, match="dp_rank"):
        ShardedSampler(100, 8, 2, 2)
    state = ShardedSampler(100, 8, seed=1).state_dict()
    with pytest.raises(ValueError, match="--seed"):
        ShardedSampler(100, 8, seed=2).load_state_dict(state)
