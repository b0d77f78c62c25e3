"""Turn text, JSONL or Parquet files into a memory-mapped token file (PREFIX.bin + PREFIX.json).

    python -m megalite.training.preprocess --input 'books/*.txt' web.jsonl.gz \\
        --output data/mycorpus --tokenizer byte --append-eos --workers 4

Documents: a .jsonl file holds one document per line, its text under --text-key; a .parquet
file one per row, its text in the --text-key column (needs pyarrow); any other file (.txt,
.md, ...) is one whole document, read as UTF-8 -- blank lines are kept as text, since
paragraphs of one document belong together. Text and JSONL may be compressed: NAME.gz, or
NAME.zst with the zstandard package. Documents are written in the order given (globs
sorted), each optionally followed by the tokenizer's eos.

Streaming: documents are read one at a time and grouped into chunks of about 1 MiB of text;
--workers N processes tokenize chunks while the main process writes the finished ones in
order, with at most 2N chunks in flight. So memory holds a few chunks (and a plain-text file
is one document, read whole), never the corpus, and the output is byte for byte the same
for every N. The .bin is written under a temporary name and the .json last, so a crashed
run never leaves a pair that looks complete. Progress (MB/s, documents, tokens) goes to
stderr every 10 seconds.
"""
import argparse
import collections
import glob
import gzip
import io
import json
import multiprocessing
import os
import sys
import time

import numpy as np

from megalite.training.data import FORMAT, FORMAT_VERSION, token_dtype
from megalite.training.tokenizer import get_tokenizer

CHUNK_CHARS = 1 << 20
PROGRESS_SECONDS = 10.0


def expand_inputs(patterns):
    """Files and globs -> a sorted, de-duplicated file list (in the order given)."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"--input {pattern!r} matches no files")
        for path in matches:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--input file {path!r} does not exist")
            if path not in files:
                files.append(path)
    return files


def _open_text(path):
    """A UTF-8 text stream over ``path``, decompressing .gz and .zst on the fly."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise ImportError(f"{path}: reading .zst files needs the zstandard package: pip "
                              "install zstandard (or decompress it first)") from None
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.TextIOWrapper(raw, encoding="utf-8")
    return open(path, encoding="utf-8")


def _kind(path):
    """"jsonl", "parquet" or "text", from the name without a compression suffix."""
    name = path[: -len(".gz")] if path.endswith(".gz") else \
        path[: -len(".zst")] if path.endswith(".zst") else path
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".parquet"):
        if name != path:
            raise ValueError(f"{path}: Parquet compresses inside the file; give the .parquet")
        return "parquet"
    return "text"


def _parquet_documents(path, text_key):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    table = pq.ParquetFile(path)
    columns = table.schema_arrow.names
    if text_key not in columns:
        raise ValueError(f"{path}: no column {text_key!r} (columns: {columns}); pass the right "
                         "--text-key")
    row = 0
    for batch in table.iter_batches(batch_size=1024, columns=[text_key]):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                raise ValueError(f"{path}: row {row}: column {text_key!r} is "
                                 f"{type(text).__name__}, not a string")
            yield text


def _jsonl_documents(path, text_key):
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # tolerate blank lines (e.g. a trailing newline)
            try:
                text = json.loads(line)[text_key]
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            except (KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: no {text_key!r} field; pass the right "
                                 "--text-key") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {text_key!r} is not a string")
            yield text


def iter_documents(path, text_key="text"):
    """Yield the documents of one file as strings."""
    kind = _kind(path)
    if kind == "parquet":
        yield from _parquet_documents(path, text_key)
    elif kind == "jsonl":
        yield from _jsonl_documents(path, text_key)
    else:
        with _open_text(path) as f:
            yield f.read()


def iter_chunks(files, text_key="text", chunk_chars=CHUNK_CHARS):
    """Consecutive documents grouped into lists of about ``chunk_chars`` characters (a
    longer document is a chunk of its own), in input order."""
    chunk, size = [], 0
    for path in files:
        for text in iter_documents(path, text_key):
            chunk.append(text)
            size += len(text)
            if size >= chunk_chars:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


# What every worker (and the main process, with one worker) encodes chunks with.
_ENCODER = {}


def _init_encoder(tokenizer, append_eos):
    # Worker processes parallelise by themselves; the HF tokenizer's own threads would fight them.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _ENCODER.update(tok=get_tokenizer(tokenizer), append_eos=append_eos)


def encode_chunk(texts):
    """One chunk -> (token ids as bytes in the file's dtype, documents, tokens, text bytes)."""
    tok, append_eos = _ENCODER["tok"], _ENCODER["append_eos"]
    ids, text_bytes = [], 0
    for text in texts:
        ids.extend(tok.encode(text))
        if append_eos:
            ids.append(tok.eos_id)
        text_bytes += len(text.encode("utf-8"))
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= tok.vocab_size):
        raise ValueError(f"token id {arr.max()} outside vocab_size {tok.vocab_size} of "
                         f"{tok.spec!r}")
    return arr.astype(token_dtype(tok.vocab_size)).tobytes(), len(texts), arr.size, text_bytes


class Progress:
    """Counts what was written; prints a line to stderr every ``every`` seconds."""

    def __init__(self, every=PROGRESS_SECONDS, stream=sys.stderr):
        self.every, self.stream = every, stream
        self.start = self.last = time.monotonic()
        self.documents = self.tokens = self.text_bytes = 0

    def add(self, documents, tokens, text_bytes):
        self.documents += documents
        self.tokens += tokens
        self.text_bytes += text_bytes
        now = time.monotonic()
        if self.every is not None and now - self.last >= self.every:
            self.last = now
            print(f"preprocess: {self.documents:,} documents, {self.tokens:,} tokens, "
                  f"{self.rates()}", file=self.stream, flush=True)

    def rates(self):
        seconds = max(time.monotonic() - self.start, 1e-9)
        return (f"{self.text_bytes / 1e6:,.1f} MB of text in {seconds:.1f} s: "
                f"{self.text_bytes / 1e6 / seconds:,.2f} MB/s, "
                f"{self.tokens / seconds:,.0f} tokens/s")


def _encoded_chunks(chunks, tokenizer, append_eos, workers):
    """encode_chunk over ``chunks`` in order, by ``workers`` processes with at most 2 x
    workers chunks in flight (so reading stays just ahead of tokenizing)."""
    if workers == 1:
        _init_encoder(tokenizer, append_eos)
        yield from map(encode_chunk, chunks)
        return
    # fork starts workers at once and shares the tokenizer object; spawn where fork is missing
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(workers, initializer=_init_encoder, initargs=(tokenizer, append_eos)) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(encode_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def preprocess(inputs, output, tokenizer="byte", text_key="text", append_eos=False,
               source_names=None, workers=1, progress=None, chunk_chars=CHUNK_CHARS):
    """Tokenize `inputs` (files or globs) into output.bin + output.json; returns the metadata.

    ``workers`` processes tokenize (the output does not depend on how many); ``progress``
    is a `Progress` (default: one printing to stderr every 10 s). source_names replaces the
    recorded input paths (e.g. to keep machine paths out of a committed file).
    """
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    tok = get_tokenizer(tokenizer)
    if append_eos and tok.eos_id is None:
        raise ValueError(f"--append-eos: tokenizer {tok.spec!r} has no eos token; drop "
                         "--append-eos or use a tokenizer that has one")
    files = expand_inputs(inputs)
    dtype = token_dtype(tok.vocab_size)
    progress = progress or Progress()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    bin_path, tmp_path = output + ".bin", output + ".bin.tmp"
    chunks = iter_chunks(files, text_key, chunk_chars)
    try:
        with open(tmp_path, "wb") as out:
            for data, documents, tokens, text_bytes in _encoded_chunks(chunks, tok,
                                                                       append_eos, workers):
                out.write(data)
                progress.add(documents, tokens, text_bytes)
    except BaseException:
        os.remove(tmp_path)
        raise
    os.replace(tmp_path, bin_path)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype.name,
            "num_tokens": progress.tokens, "num_documents": progress.documents,
            "tokenizer": tok.spec, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "append_eos": append_eos,
            "sources": list(source_names) if source_names is not None else files}
    with open(output + ".json.tmp", "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    os.replace(output + ".json.tmp", output + ".json")
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m megalite.training.preprocess",
                                description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="files or globs: .jsonl[.gz|.zst] (one document per line), .parquet "
                        "(one per row), else one document per file (.gz/.zst decompressed)")
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin/.json")
    p.add_argument("--tokenizer", default="byte",
                   help="byte | tiktoken:ENCODING | hf:PATH (default: byte)")
    p.add_argument("--text-key", "--json-key", "--jsonl-key", dest="text_key", default="text",
                   help="the JSONL field or Parquet column holding the text (default: text)")
    p.add_argument("--append-eos", action="store_true",
                   help="append the tokenizer's eos after every document")
    p.add_argument("--workers", type=int, default=1,
                   help="tokenizing processes (default 1; the output is the same for any)")
    args = p.parse_args(argv)
    progress = Progress()
    try:
        meta = preprocess(args.input, args.output, args.tokenizer, args.text_key,
                          args.append_eos, workers=args.workers, progress=progress)
    except (ValueError, OSError, ImportError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.output}.bin: {meta['num_tokens']} tokens ({meta['dtype']}) from "
          f"{meta['num_documents']} documents, tokenizer {meta['tokenizer']}; "
          f"{progress.rates()} with {args.workers} worker(s)")


if __name__ == "__main__":
    main()
