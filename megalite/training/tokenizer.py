"""Tokenizers behind one small interface, chosen by a spec string.

    get_tokenizer("byte")                   built in, vocab 256, never needs a file
    get_tokenizer("tiktoken:cl100k_base")   tiktoken, from its local cache only
    get_tokenizer("hf:/path/to/dir")        Hugging Face tokenizer directory or tokenizer.json

Every tokenizer has `.spec` (the string that rebuilds it, stored in token-file metadata),
`.vocab_size`, `.eos_id` (int or None), `.encode(str) -> list[int]`, `.decode(ids) -> str`.
Nothing here ever downloads: a tokenizer that is not on disk is an error that says so.
"""
import os
from pathlib import Path


class ByteTokenizer:
    """Token ids are the UTF-8 bytes of the text: vocab 256, no merges, no files.

    eos_id is 0: the NUL byte never occurs in text corpora, so when preprocessing with
    --append-eos it marks document ends unambiguously (and decodes back to "\\x00").
    There are no other special tokens.
    """
    spec = "byte"
    vocab_size = 256
    eos_id = 0

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"byte tokenizer ids must be in [0, 256); got {bad[:5]}")
        # A model can emit a byte sequence that is not valid UTF-8 (e.g. half a character);
        # show a replacement character rather than failing mid-generation.
        return bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self):
        return "ByteTokenizer(vocab_size=256, eos_id=0)"


class TiktokenTokenizer:
    """A tiktoken encoding by name. Offline only: its BPE file must already be in tiktoken's
    cache (set TIKTOKEN_CACHE_DIR to a folder holding it); we refuse to fetch it."""

    def __init__(self, name):
        try:
            import tiktoken
            import tiktoken.load
        except ImportError:
            raise ImportError(f"tokenizer 'tiktoken:{name}' needs the tiktoken package: "
                              "pip install tiktoken (or use --tokenizer byte)") from None
        real_read = tiktoken.load.read_file

        def local_only(blobpath):
            # tiktoken calls read_file only when the file is not in its cache.
            if str(blobpath).startswith(("http://", "https://")):
                raise FileNotFoundError(
                    f"tiktoken encoding {name!r} is not cached locally and megalite never "
                    f"downloads (wanted {blobpath}). Fetch it once where there is network: "
                    f"TIKTOKEN_CACHE_DIR=$HOME/.tiktoken python -c \"import tiktoken; "
                    f"tiktoken.get_encoding('{name}')\", then run with the same "
                    "TIKTOKEN_CACHE_DIR; or use --tokenizer byte.")
            return real_read(blobpath)

        tiktoken.load.read_file = local_only
        try:
            self._enc = tiktoken.get_encoding(name)
        except ValueError as e:  # unknown encoding name
            raise ValueError(f"unknown tiktoken encoding {name!r}: {e}") from None
        finally:
            tiktoken.load.read_file = real_read
        self.spec = f"tiktoken:{name}"
        self.vocab_size = self._enc.n_vocab
        try:
            self.eos_id = self._enc.eot_token
        except KeyError:  # an encoding without <|endoftext|>
            self.eos_id = None

    def encode(self, text):
        # Special-token text inside a document is treated as ordinary text, never as eos.
        return self._enc.encode_ordinary(text)

    def decode(self, ids):
        return self._enc.decode([int(i) for i in ids])


# Names a bare tokenizer.json (no tokenizer_config.json to say which token is eos)
# commonly gives its end token; the first one present is used.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory (save_pretrained output) or a
    tokenizer.json file. Uses transformers when installed (it knows the eos token from
    tokenizer_config.json), else the `tokenizers` library on tokenizer.json.

    encode() adds no special tokens (no BOS): documents are separated by --append-eos.
    """

    def __init__(self, path):
        self.spec = f"hf:{path}"
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"Hugging Face tokenizer path {str(p)!r} does not exist; "
                                    "give a local directory or tokenizer.json (megalite never "
                                    "downloads from the hub)")
        if p.is_dir() and _has_transformers():
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            self._encode = lambda text: tok.encode(text, add_special_tokens=False)
            self._decode = tok.decode
            self.vocab_size = len(tok)  # includes added tokens, unlike tok.vocab_size
            self.eos_id = tok.eos_token_id
            if self.eos_id is None:  # a bare tokenizer.json without tokenizer_config.json
                self.eos_id = _guess_eos(tok.get_vocab())
            return
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {str(p)!r}; install transformers to "
                                    "load other tokenizer formats")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(f"tokenizer {self.spec!r} needs the tokenizers package: "
                              "pip install tokenizers (or transformers)") from None
        tok = Tokenizer.from_file(str(file))
        self._encode = lambda text: tok.encode(text, add_special_tokens=False).ids
        self._decode = tok.decode
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = _guess_eos(tok.get_vocab(with_added_tokens=True))

    def encode(self, text):
        return list(self._encode(text))

    def decode(self, ids):
        return self._decode([int(i) for i in ids])


def _guess_eos(vocab):
    return next((vocab[name] for name in _EOS_NAMES if name in vocab), None)


def _has_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def get_tokenizer(spec):
    """Build a tokenizer from its spec: "byte", "tiktoken:NAME" or "hf:PATH"."""
    if not isinstance(spec, str):
        return spec  # already a tokenizer object
    kind, _, arg = spec.partition(":")
    if spec == "byte":
        return ByteTokenizer()
    if kind == "tiktoken" and arg:
        return TiktokenTokenizer(arg)
    if kind == "hf" and arg:
        return HFTokenizer(os.path.expanduser(arg))
    raise ValueError(f"unknown tokenizer spec {spec!r}; use 'byte', 'tiktoken:ENCODING' "
                     "(e.g. tiktoken:cl100k_base) or 'hf:/path/to/tokenizer_dir_or_json'")
