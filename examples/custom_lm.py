"""Build your own tensor- and pipeline-parallel language model from megalite's parallel
layers, and train it with megalite's trainer (checkpoints, resume, fault handling, metrics).

A small LM written from scratch, Megatron style: each MLP and attention block is a
column-parallel linear followed by a row-parallel one, so it needs one all-reduce forward
and one backward; the vocabulary is split across ranks and the loss never gathers it. The
blocks are split over pipeline stages. The trainer's flags all apply, except those that
build its GPT (--model, --init-from-hf, ...):

    python examples/custom_lm.py --steps 30                  # one process
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 examples/custom_lm.py --tp 2 --pp 2 \
        --steps 30 --save runs/custom_lm                      # run it again: it resumes

What the trainer needs of the model is megalite.training.trainable.TrainableModel (below:
the methods after ``forward``).
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite import parallel
from megalite.pipeline import layers_per_stage, stage_layers
from megalite.training import Trainer, parse_args, run_cli

DEFAULTS = dict(steps=30, seq_len=64, global_batch_size=8, micro_batch_size=4, lr=3e-3,
                log_interval=5)


@contextlib.contextmanager
def seeded(seed: int):
    """Draw a part's initial weights from its own seed (its global index), so that every
    layout builds the same full weights whatever stages a rank holds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


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
    """This rank's ``stages`` (of ``num_stages``) of the LM: stage 0 embeds, the last one
    normalizes and projects to the (TP-sharded) vocabulary; the blocks are split evenly."""

    def __init__(self, ps, stages, num_stages, vocab=256, d=128, heads=4, layers=4,
                 max_seq_len=256, seed=0):
        super().__init__()
        self.ps, self.stages, self.num_stages = ps, sorted(stages), num_stages
        self.config = dict(vocab=vocab, d=d, heads=heads, layers=layers,
                           max_seq_len=max_seq_len, seed=seed)
        layers_per_stage(layers, num_stages)  # a ValueError when a stage would get none
        self.stage_blocks = {s: stage_layers(layers, num_stages, s) for s in self.stages}
        if 0 in self.stages:
            with seeded(seed):
                self.embed = parallel.VocabParallelEmbedding(vocab, d)
                self.pos = nn.Parameter(torch.randn(max_seq_len, d) * 0.02)
        # Global indices as names: checkpoints load into any layout by name.
        self.blocks = nn.ModuleDict()
        for s in self.stages:
            for i in self.stage_blocks[s]:
                with seeded(seed + 1 + i):
                    self.blocks[str(i)] = Block(d, heads, ps.tp)
        if num_stages - 1 in self.stages:
            with seeded(seed + 1 + layers):
                self.norm = nn.LayerNorm(d)
                # Column parallel over the vocabulary: each rank's logits are its shard.
                self.head = parallel.ColumnParallelLinear(
                    d, parallel.padded_vocab_size(vocab, ps.tp), bias=False)
        self.to(ps.device)

    def forward(self, x, stage: int):
        if stage == 0:
            x = self.embed(x) + self.pos[: x.shape[1]]
        for i in self.stage_blocks[stage]:
            x = self.blocks[str(i)](x)
        if stage == self.num_stages - 1:
            x = self.head(self.norm(x))                     # [b, s, padded_vocab / tp]
        return x

    # --- what megalite's trainer needs (megalite.training.trainable.TrainableModel) ---
    def stage_modules(self):
        return {s: (lambda x, s=s: self(x, s)) for s in self.stages}

    def activation_shape(self, micro_batch_size, seq_len):
        return (micro_batch_size, seq_len, self.config["d"])

    def loss(self, logits, targets):
        return parallel.vocab_parallel_cross_entropy(logits, targets,
                                                     self.config["vocab"]).mean()

    def shared_embedding_params(self):
        return []  # the output head is not tied to the embedding

    def checkpoint_config(self):
        return dict(self.config)

    def check_checkpoint_config(self, saved):
        if saved != self.config:
            raise ValueError(f"another model: {saved} (this one: {self.config})")


def main(argv=None) -> int:
    args = parse_args(argv, defaults=DEFAULTS)  # --config and the command line override them
    build = lambda ps, stages, num_stages: TinyLM(ps, stages, num_stages,  # noqa: E731
                                                  max_seq_len=args.seq_len, seed=args.seed)
    return Trainer(args, model_provider=build).run()


if __name__ == "__main__":
    run_cli(main)
