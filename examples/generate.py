"""Sample text from a checkpoint saved at any (tp, pp, dp) layout.

    python examples/generate.py --load runs/tiny --prompt "def " --max-new-tokens 200
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 examples/generate.py --tp 2 --load runs/tiny

Checkpoints hold full tensors, so any tp can load them. Generation runs the model at pp = 1
(each TP rank holds its vocabulary shard; the logits of the last position are gathered, and
every rank samples the same token from the same seed). Without a KV cache each new token
recomputes the context (at most max_seq_len tokens): fine for small models.
"""
import argparse
import os

import torch

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.training.checkpoint import load_checkpoint, read_checkpoint_meta
from megalite.training.tokenizer import get_tokenizer


@torch.no_grad()
def generate(model, tokens: list[int], max_new_tokens: int, temperature: float, top_k: int,
             generator: torch.Generator, eos_id=None) -> list[int]:
    cfg, ps = model.cfg, model.ps
    out = list(tokens)
    for _ in range(max_new_tokens):
        context = torch.tensor([out[-cfg.max_seq_len:]], device=ps.device)
        logits = model(context)[:, -1]                                 # [1, V_padded / tp]
        logits = parallel.gather_from_tp_region(logits, ps.tp_group)[0, :cfg.vocab_size]
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits.float() / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, -1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        out.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="checkpoint directory (--save of a run)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--prompt", default="The ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer spec (byte, tiktoken:NAME, hf:PATH); default: the one the "
                        "training data was made with, else byte")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: $OMP_NUM_THREADS, else 1)")
    args = p.parse_args()
    # Decoding one sequence is a chain of small matmuls: extra CPU threads mostly wait on each
    # other, and on a busy machine their spin-waits made sampling 12x slower than one thread.
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or 1
    torch.set_num_threads(threads)

    ps = parallel.initialize(tp=args.tp)
    if ps.pp > 1:
        raise ValueError("generation runs at pp=1; use --tp (and dp) only")
    meta = read_checkpoint_meta(args.load)
    cfg = GPTConfig(**{**meta["config"], "sequence_parallel": False, "dropout": 0.0,
                       "layers_per_stage": None})
    model = GPT(cfg)
    step = load_checkpoint(meta["path"], model)
    model.eval()
    spec = args.tokenizer or meta.get("extra", {}).get("tokenizer") or "byte"
    tokenizer = get_tokenizer(spec)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise ValueError("--prompt encodes to no tokens; give at least one character")
    generator = torch.Generator().manual_seed(args.seed)
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k,
                   generator, getattr(tokenizer, "eos_id", None))
    if ps.rank == 0:
        print(f"# {meta['path']} (step {step}), tp={ps.tp}, {spec} tokenizer", flush=True)
        print(tokenizer.decode(out), flush=True)
    parallel.destroy()


if __name__ == "__main__":
    main()
