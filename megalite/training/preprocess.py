"""Turn text or JSONL files into a memory-mapped token file (PREFIX.bin + PREFIX.json).

    python -m megalite.training.preprocess --input 'books/*.txt' more.jsonl \\
        --output data/mycorpus --tokenizer byte --append-eos

Documents: a .jsonl file holds one document per line, its text under --jsonl-key; any
other file (.txt, .md, ...) is one whole document, read as UTF-8 -- blank lines are kept
as text, since paragraphs of one document belong together. Documents are
written in the order given (globs sorted), each optionally followed by the tokenizer's eos.

Streaming: one document is tokenized and appended at a time, so memory holds one document,
never the corpus. The .bin is written under a temporary name and the .json last, so a
crashed run never leaves a pair that looks complete.
"""
import argparse
import glob
import json
import os
import sys

import numpy as np

from megalite.training.data import FORMAT, FORMAT_VERSION, token_dtype
from megalite.training.tokenizer import get_tokenizer


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


def iter_documents(path, jsonl_key="text"):
    """Yield the documents of one file as strings."""
    if not path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            yield f.read()
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # tolerate blank lines (e.g. a trailing newline)
            try:
                text = json.loads(line)[jsonl_key]
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            except (KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: no {jsonl_key!r} field; pass the right "
                                 "--jsonl-key") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {jsonl_key!r} is not a string")
            yield text


def preprocess(inputs, output, tokenizer="byte", jsonl_key="text", append_eos=False,
               source_names=None):
    """Tokenize `inputs` (files or globs) into output.bin + output.json; returns the metadata.

    source_names replaces the recorded input paths (e.g. to keep machine paths out of a
    committed file).
    """
    tok = get_tokenizer(tokenizer)
    if append_eos and tok.eos_id is None:
        raise ValueError(f"--append-eos: tokenizer {tok.spec!r} has no eos token; drop "
                         "--append-eos or use a tokenizer that has one")
    files = expand_inputs(inputs)
    dtype = token_dtype(tok.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    bin_path, tmp_path = output + ".bin", output + ".bin.tmp"
    num_tokens = num_docs = 0
    with open(tmp_path, "wb") as out:
        for path in files:
            for text in iter_documents(path, jsonl_key):
                ids = tok.encode(text)
                if append_eos:
                    ids.append(tok.eos_id)
                arr = np.asarray(ids, dtype=np.int64)
                if arr.size and (arr.min() < 0 or arr.max() >= tok.vocab_size):
                    raise ValueError(f"{path}: token id {arr.max()} outside vocab_size "
                                     f"{tok.vocab_size} of {tok.spec!r}")
                arr.astype(dtype).tofile(out)
                num_tokens += arr.size
                num_docs += 1
    os.replace(tmp_path, bin_path)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype.name,
            "num_tokens": num_tokens, "num_documents": num_docs, "tokenizer": tok.spec,
            "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "append_eos": append_eos,
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
                   help="files or globs: .jsonl (one document per line), else one document "
                        "per file")
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin/.json")
    p.add_argument("--tokenizer", default="byte",
                   help="byte | tiktoken:ENCODING | hf:PATH (default: byte)")
    p.add_argument("--jsonl-key", default="text", help="JSONL field with the text")
    p.add_argument("--append-eos", action="store_true",
                   help="append the tokenizer's eos after every document")
    args = p.parse_args(argv)
    try:
        meta = preprocess(args.input, args.output, args.tokenizer, args.jsonl_key,
                          args.append_eos)
    except (ValueError, OSError, ImportError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.output}.bin: {meta['num_tokens']} tokens ({meta['dtype']}) from "
          f"{meta['num_documents']} documents, tokenizer {meta['tokenizer']}")


if __name__ == "__main__":
    main()
