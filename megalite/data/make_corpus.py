"""Regenerate the bundled training corpus from the Python standard library's docstrings.

    python -m megalite.data.make_corpus

writes megalite/data/corpus.txt (about 1 MB of English prose about programming, no
downloads) and its byte-level token file corpus.bin + corpus.json. The output is committed,
so this only needs re-running to change the corpus; it is deterministic for a given Python
version (the module list, the order and the size cap are fixed here).

Docstrings rather than full pydoc pages: pydoc repeats "Methods inherited from ..." and
"__dict__ dictionary for instance variables" boilerplate thousands of times, which a tiny
model would memorise instead of learning English-like text.
"""
import codecs
import contextlib
import importlib
import inspect
import io
import re
from pathlib import Path

# Fixed order: prose-heavy modules first, so the size cap keeps the most readable text.
MODULES = [
    "this", "collections", "itertools", "functools", "json", "re", "string", "textwrap",
    "datetime", "random", "statistics", "pathlib", "argparse", "logging", "unittest", "heapq",
    "bisect", "contextlib", "dataclasses", "enum", "fractions", "decimal", "difflib", "csv",
    "shutil", "tempfile", "typing", "abc", "copy", "pprint", "operator", "math", "time",
    "calendar", "zipfile", "tarfile", "email.message", "http.client", "urllib.parse",
    "sqlite3", "threading", "queue", "subprocess", "socket", "io", "os", "sys", "inspect",
    "ast", "tokenize", "pickle", "struct", "hashlib", "base64", "gettext", "locale", "codecs",
    "weakref", "types", "glob", "fnmatch", "configparser", "xml.etree.ElementTree",
    "html.parser", "asyncio", "concurrent.futures", "multiprocessing", "selectors", "signal",
    "traceback", "warnings", "doctest", "timeit", "pdb", "unittest.mock", "logging.handlers",
    "email.utils", "email.parser", "urllib.request", "http.server", "http.cookies",
    "xml.dom.minidom", "ipaddress", "uuid", "secrets", "shlex", "sched", "gzip", "bz2",
    "lzma", "zlib", "mailbox", "smtplib", "ftplib", "imaplib", "optparse", "getopt", "cmd",
    "code", "dis", "pydoc", "importlib", "pkgutil", "runpy", "platform", "sysconfig",
    "filecmp", "fileinput", "linecache", "stat", "numbers", "cmath", "array", "reprlib",
    "graphlib", "contextvars", "ssl", "trace", "profile", "pstats", "unicodedata",
    "mimetypes", "plistlib", "netrc", "wave", "colorsys", "zoneinfo",
]
MAX_BYTES = 1_000_000  # the committed .txt + uint16 .bin stay under ~3 MB together
HERE = Path(__file__).resolve().parent
# Memory addresses (e.g. "<object object at 0x7f...>" in default values) differ per run.
ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _signature(obj):
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _entry(qualname, obj):
    doc = inspect.getdoc(obj)
    if not doc or len(doc) < 40:  # skip one-liners like "Return self==value."
        return None
    head = qualname + (_signature(obj) if callable(obj) else "")
    body = "\n".join(("    " + line).rstrip() for line in doc.splitlines())
    return f"{head}\n{body}\n"


def module_text(name):
    """The module docstring, then each public class/function (and class method) documented."""
    if name == "this":  # `import this` prints the Zen; its text is stored rot13-encoded
        with contextlib.redirect_stdout(io.StringIO()):
            mod = importlib.import_module("this")
        return "The Zen of Python\n=================\n" + codecs.decode(mod.s, "rot13") + "\n"
    mod = importlib.import_module(name)
    parts = [f"Module {name}\n{'=' * (7 + len(name))}\n{inspect.getdoc(mod) or ''}\n"]
    seen = set()  # aliases (e.g. os.path functions re-exported) are documented once
    for attr in sorted(vars(mod)):
        obj = getattr(mod, attr)
        # Packages (asyncio, unittest, ...) define their objects in submodules.
        home = getattr(obj, "__module__", None) or ""
        if attr.startswith("_") or not (home + ".").startswith(mod.__name__ + "."):
            continue
        if id(obj) in seen or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        seen.add(id(obj))
        parts.append(_entry(f"{name}.{attr}", obj))
        if inspect.isclass(obj):
            for meth, fn in sorted(vars(obj).items()):
                if not meth.startswith("_") and inspect.isroutine(fn):
                    fn = getattr(fn, "__func__", fn)  # unwrap classmethods for the signature
                    parts.append(_entry(f"{name}.{attr}.{meth}", fn))
    return ADDRESS.sub("", "\n".join(p for p in parts if p))


def build_text(max_bytes=MAX_BYTES):
    out, size = [], 0
    for name in MODULES:
        text = module_text(name) + "\n"
        if size + len(text.encode("utf-8")) > max_bytes:
            break  # whole modules only, so the corpus never ends mid-sentence
        out.append(text)
        size += len(text.encode("utf-8"))
    return "".join(out)


def main():
    txt = HERE / "corpus.txt"
    txt.write_text(build_text(), encoding="utf-8")
    # Imported only now: importing torch loads stdlib submodules that would add entries to
    # some modules' namespaces and change the text.
    from megalite.training.preprocess import preprocess

    meta = preprocess([str(txt)], str(HERE / "corpus"), tokenizer="byte",
                      source_names=["corpus.txt"])
    print(f"wrote {txt} ({txt.stat().st_size} bytes) and corpus.bin: {meta['num_tokens']} tokens")


if __name__ == "__main__":
    main()
