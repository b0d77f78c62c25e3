"""Build your own tensor-parallel language model from megalite's parallel layers.

A small LM written from scratch, Megatron style: each MLP and attention block is a
column-parallel linear followed by a row-parallel one, so it needs one all-reduce forward
and one backward; the vocabulary is split across ranks and the loss never gathers it.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 examples/custom_lm.py --tp 2
    python examples/custom_lm.py            # one process, no torch.distributed
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite import parallel
from megalite.training.data import TokenDataset, default_corpus_path


class Block(nn.Module):
    def __init__(self, d: int, heads: int, tp: int):
        super().__init__()
        self.local_heads, self.head_dim = heads // tp, d // heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        # q, k and v fused into one column-parallel layer: rank r holds its heads' q, k, v.
        self.qkv = parallel.ColumnParallelLinear(d, 3 * d, partition_sizes=[d, d, d])
        self.proj = parallel.RowParallelLinear(d, d)
        self.fc = parallel.ColumnParallelLinear(d, 4 * d)
        self.out = parallel.RowParallelLinear(4 * d, d)

    def attention(self, x):
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, self.local_heads, self.head_dim).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, -1))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, layers: int, seq_len: int, tp: int):
        super().__init__()
        self.vocab = vocab
        self.embed = parallel.VocabParallelEmbedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq_len, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, tp) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        # Output head: column parallel over the (padded) vocabulary, logits stay sharded.
        self.head = parallel.ColumnParallelLinear(d, self.embed.padded_size, bias=False)

    def forward(self, tokens, targets):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))                    # [b, s, padded_vocab / tp]
        loss = parallel.vocab_parallel_cross_entropy(logits, targets, self.vocab)
        return loss.mean()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args()

    ps = parallel.initialize(tp=args.tp)      # dp = world // tp
    torch.manual_seed(0)                      # same seed everywhere: same full weights
    data = TokenDataset(default_corpus_path(), args.seq_len)
    model = TinyLM(vocab=256, d=128, heads=4, layers=2, seq_len=args.seq_len, tp=ps.tp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(ps.dp_rank)  # each dp replica reads its own batches
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(data), (args.batch_size,), generator=g).tolist()
        tokens, targets = (torch.stack(t) for t in zip(*(data[i] for i in idx)))
        loss = model(tokens, targets)
        optimizer.zero_grad()
        loss.backward()
        parallel.allreduce_data_parallel(model.parameters(), ps)  # no-op at dp = 1
        optimizer.step()
        if ps.rank == 0 and (step % 5 == 0 or step == 1):
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
    parallel.destroy()


if __name__ == "__main__":
    main()
