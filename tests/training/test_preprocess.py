"""Preprocessing at size: worker processes, compressed JSONL and text, Parquet, progress."""
import gzip
import io
import json
import sys

import numpy as np
import pytest

from megalite.training.data import read_metadata
from megalite.training.preprocess import Progress, preprocess

DOCS = [f"document {i}: " + "héllo wörld ∑ " * (i % 7) + "x" * (i % 13) for i in range(300)]


def _byte_tokens(texts, eos=True):
    return [t for text in texts for t in list(text.encode()) + ([0] if eos else [])]


def _write_inputs(tmp_path):
    """The same documents spread over a .txt, a .txt.gz, a .jsonl.gz and (with pyarrow) a
    .parquet; returns (input paths, the documents in the order they are read)."""
    (tmp_path / "a.txt").write_text(DOCS[0], encoding="utf-8")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(DOCS[1])
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, text in enumerate(DOCS[2:150]):
            f.write(json.dumps({"id": i, "body": text}) + "\n")
    inputs, docs = [str(tmp_path / n) for n in ("a.txt", "b.txt.gz", "c.jsonl.gz")], DOCS[:150]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return inputs, docs
    table = pa.table({"id": list(range(150)), "body": DOCS[150:]})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=40)
    return inputs + [str(tmp_path / "d.parquet")], DOCS


def test_workers_give_the_same_bytes_for_every_format(tmp_path):
    inputs, docs = _write_inputs(tmp_path)
    outputs = {}
    for workers in (1, 2):
        out = str(tmp_path / f"w{workers}")
        meta = preprocess(inputs, out, text_key="body", append_eos=True, workers=workers,
                          chunk_chars=700)  # many chunks: the workers interleave
        assert meta["num_documents"] == len(docs) and read_metadata(out) == meta
        outputs[workers] = (tmp_path / f"w{workers}.bin").read_bytes()
    assert outputs[1] == outputs[2]
    assert np.frombuffer(outputs[1], np.uint16).tolist() == _byte_tokens(docs)


def test_zstd_or_its_error(tmp_path):
    docs = DOCS[:20]
    raw = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    try:
        import zstandard
    except ImportError:
        (tmp_path / "z.jsonl.zst").write_bytes(b"not read")
        with pytest.raises(ImportError, match="pip install zstandard"):
            preprocess([str(tmp_path / "z.jsonl.zst")], str(tmp_path / "z"))
        return
    (tmp_path / "z.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    preprocess([str(tmp_path / "z.jsonl.zst")], str(tmp_path / "z"), append_eos=True)
    assert np.fromfile(tmp_path / "z.bin", np.uint16).tolist() == _byte_tokens(docs)


def test_parquet_errors(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["a", None]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"no column 'text' .*--text-key"):
        preprocess([str(tmp_path / "p.parquet")], str(tmp_path / "o"))
    with pytest.raises(ValueError, match="row 2: column 'content' is NoneType"):
        preprocess([str(tmp_path / "p.parquet")], str(tmp_path / "o"), text_key="content")
    assert not (tmp_path / "o.bin.tmp").exists() and not (tmp_path / "o.bin").exists()
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install pyarrow"):
        preprocess([str(tmp_path / "p.parquet")], str(tmp_path / "o"), text_key="content")


def test_progress_lines():
    stream = io.StringIO()
    progress = Progress(every=0.0, stream=stream)
    progress.add(3, 120, 2_000_000)
    progress.add(2, 80, 1_000_000)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("preprocess: 5 documents, 200 tokens, "
                                                    "3.0 MB of text in ")
    assert "MB/s" in lines[-1] and "tokens/s" in lines[-1]
    quiet = io.StringIO()
    Progress(every=60.0, stream=quiet).add(1, 1, 1)  # not spammy: nothing before a minute
    assert quiet.getvalue() == ""
