"""Preprocessing throughput: MB/s and tokens/s at 1 and 2 workers, byte-level and a Hugging
Face BPE tokenizer, on JSONL built from the bundled corpus (nothing downloaded).

    python examples/bench_preprocess.py [--mb 8] [--workers 1 2] [--out rows.jsonl]

The BPE tokenizer (vocab 4096) is trained here, with the `tokenizers` library, on the
bundled corpus. Each configuration writes a token file; the table says whether the outputs
of all worker counts are byte-identical. Besides wall-clock rates it reports the CPU
seconds of the main process and the workers together (MB per CPU second does not depend on
how busy a shared machine is; the wall-clock rates do).
"""
import argparse
import hashlib
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

from megalite.training.data import default_corpus_path
from megalite.training.preprocess import Progress, preprocess


def make_jsonl(path, megabytes):
    """Paragraphs of the bundled corpus as JSONL documents, repeated to ``megabytes``."""
    paragraphs = [p for p in Path(default_corpus_path() + ".txt").read_text().split("\n\n")
                  if p.strip()]
    written, copy = 0, 0
    with open(path, "w") as f:
        while written < megabytes * 1e6:
            for p in paragraphs:
                line = json.dumps({"text": f"[{copy}] {p}"}) + "\n"
                f.write(line)
                written += len(line.encode())
            copy += 1


def train_bpe(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([default_corpus_path() + ".txt"], trainer)
    path = Path(directory) / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def cpu_seconds():
    """User + system CPU time of this process and its finished children (pool workers)."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=8.0, help="JSONL size in MB")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default=None, help="append machine-readable rows (JSONL) here")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        make_jsonl(corpus, args.mb)
        tokenizers = {"byte": "byte", "hf-bpe-4096": f"hf:{train_bpe(tmp)}"}
        print(f"{'tokenizer':<12} {'workers':>7} {'MB/s':>8} {'tokens/s':>12} "
              f"{'tokens/s/worker':>16} {'seconds':>8} {'CPU s':>7} {'MB/CPU s':>9}  "
              "output sha256")
        for name, spec in tokenizers.items():
            for workers in args.workers:
                out = os.path.join(tmp, f"{name}_{workers}")
                progress = Progress(every=None)
                cpu0, t0 = cpu_seconds(), time.perf_counter()
                meta = preprocess([corpus], out, spec, append_eos=True, workers=workers,
                                  progress=progress)
                seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
                digest = hashlib.sha256(Path(out + ".bin").read_bytes()).hexdigest()[:12]
                row = {"op": "preprocess", "tokenizer": name, "workers": workers,
                       "text_mb": progress.text_bytes / 1e6, "tokens": meta["num_tokens"],
                       "seconds": seconds, "mb_per_s": progress.text_bytes / 1e6 / seconds,
                       "tokens_per_s": meta["num_tokens"] / seconds,
                       "tokens_per_s_per_worker": meta["num_tokens"] / seconds / workers,
                       "cpu_seconds": cpu, "mb_per_cpu_s": progress.text_bytes / 1e6 / cpu,
                       "sha256": digest, "cpus": os.cpu_count(),
                       "machine": platform.processor() or platform.machine()}
                rows.append(row)
                print(f"{name:<12} {workers:>7} {row['mb_per_s']:>8.2f} "
                      f"{row['tokens_per_s']:>12,.0f} {row['tokens_per_s_per_worker']:>16,.0f} "
                      f"{seconds:>8.2f} {cpu:>7.2f} {row['mb_per_cpu_s']:>9.2f}  {digest}")
    for name in tokenizers:
        digests = {r["sha256"] for r in rows if r["tokenizer"] == name}
        print(f"{name}: outputs of workers {args.workers} "
              + ("identical" if len(digests) == 1 else "DIFFER"))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
