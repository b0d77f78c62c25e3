"""The planner's memory model against what megalite really holds on CPU.

Per rank and layout: parameter, gradient and AdamW-state bytes summed over the real tensors
after one training step (the distributed optimizer's: its shards' state), and the peak of
the activation bytes held during the step's schedule (every saved tensor's storage, counted
while any graph still holds it, through saved-tensor hooks; what recompute regions keep and
recompute; the fused head's dx and fp32 dW, which it keeps outside autograd's saved
tensors), compared with ``megalite.plan.memory`` within 10%.
"""
import contextlib
import weakref

import torch

from megalite import parallel
from megalite.models import GPT, GPTConfig
from megalite.parallel import ParallelState
from megalite.pipeline import build_schedule, rank_stages
from megalite.kernels.linear_cross_entropy import LinearCrossEntropyFunction
from megalite.models import recompute
from megalite.models.activation_memory import saved_activation_bytes
from megalite.plan import Layout, memory
from megalite.training.optim import build_optimizer
from megalite.training.step import train_step
from world import run_world

CFG = GPTConfig(vocab_size=96, n_layers=8, n_heads=4, n_kv_heads=2, d_model=32, d_ff=64,
                max_seq_len=16, kernels="torch")
SEQ, MICRO, GLOBAL = 16, 2, 8


class _Held:
    """What autograd keeps instead of a saved tensor; its lifetime is the saved tensor's."""
    __slots__ = ("tracker", "key", "tensor")

    def __init__(self, tracker, key, nbytes, tensor):
        self.tracker, self.key, self.tensor = tracker, key, tensor
        count = tracker.refs.get(key, 0)
        tracker.refs[key] = count + 1
        if count == 0:
            tracker.sizes[key] = nbytes
            tracker.current += nbytes
            tracker.peak = max(tracker.peak, tracker.current)

    def __del__(self):
        t = self.tracker
        t.refs[self.key] -= 1
        if t.refs[self.key] == 0:
            del t.refs[self.key]
            t.current -= t.sizes.pop(self.key)


class SavedBytes:
    """Peak bytes of the storages autograd saves for backward, parameters excluded."""

    def __init__(self, model):
        self.exclude = {t.untyped_storage().data_ptr()
                        for t in list(model.parameters()) + list(model.buffers())}
        self.refs, self.sizes, self.current, self.peak = {}, {}, 0, 0

    def pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() in self.exclude or storage.nbytes() == 0:
            return t
        # detached: a saved output holding its own grad_fn would be a reference cycle,
        # keeping graphs alive past their backward (retain_graph=True in I and W)
        return _Held(self, storage.data_ptr(), storage.nbytes(), t.detach())

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    @contextlib.contextmanager
    def hooks(self):
        """Saved tensors, plus what autograd's hooks cannot see: recompute regions' inputs
        (until recomputed) and recomputed tensors (until their op's backward lets them go),
        and the fused head's gradients (as long as its graph node)."""
        tracker, region_cls = self, recompute._Region
        fused_forward = LinearCrossEntropyFunction.forward

        class Region(region_cls):
            def __init__(self, fn, args):
                super().__init__(fn, args)
                self.held_args = [tracker.pack(a) for a in args if isinstance(a, torch.Tensor)]

            def recompute(self):
                super().recompute()
                self.held_args = None
                for ref in self.placeholders.values():
                    holder = ref()
                    if holder is not None and holder.tensor is not None:
                        weakref.finalize(holder, lambda held: None, tracker.pack(holder.tensor))

        def forward(ctx, *args):
            out = fused_forward(ctx, *args)
            ctx.held = [tracker.pack(t) for t in ctx.grads if t is not None]
            return out

        recompute._Region, LinearCrossEntropyFunction.forward = Region, staticmethod(forward)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            recompute._Region, LinearCrossEntropyFunction.forward = \
                region_cls, staticmethod(fused_forward)


def measure(cfg, layout: Layout, state):
    """One AdamW step of ``cfg`` at ``layout`` on this rank: measured bytes per part."""
    torch.manual_seed(0)
    table = build_schedule(layout.schedule, layout.pp, layout.num_microbatches,
                           virtual=layout.virtual_stages)
    model = GPT(cfg.replace(sequence_parallel=layout.sequence_parallel,
                            fused_loss=layout.fused_loss, recompute=layout.recompute,
                            recompute_layers=layout.recompute_layers), state=state,
                stages=rank_stages(table)[state.pp_rank], num_stages=layout.num_stages)
    opt = build_optimizer(model, lr=1e-3, distributed=layout.distributed_optimizer)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (layout.global_batch_size, SEQ + 1), generator=g)
    per_rank = layout.global_batch_size // state.dp
    mine = data[state.dp_rank * per_rank:(state.dp_rank + 1) * per_rank]
    saved = SavedBytes(model)
    with saved.hooks():
        train_step(model, opt, mine[:, :-1], mine[:, 1:], micro_batch_size=MICRO,
                   schedule=table)
    params = list(model.parameters())
    return {
        "parameters": sum(p.numel() * p.element_size() for p in params),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params),
        "optimizer state": sum(t.numel() * t.element_size() for s in opt.state.values()
                               for k, t in s.items() if k != "step"),
        "activations": saved.peak,
    }


def compare(cfg, layout, state, measured):
    predicted = memory(cfg, layout).ranks[state.pp_rank].parts()
    where = f"{layout.describe()} pp rank {state.pp_rank} tp rank {state.tp_rank}"
    for part, value in measured.items():
        assert abs(predicted[part] - value) <= 0.10 * value, \
            f"{part}: predicted {predicted[part]:.0f} B, measured {value} B ({where})"
    return {part: (predicted[part], value) for part, value in measured.items()}


WORLD_LAYOUTS = [  # (tp, pp, dp, schedule, virtual, sequence parallel, tied, Layout options)
    (2, 2, 1, "1f1b", None, False, False, dict(recompute="full")),
    (1, 2, 2, "interleaved-1f1b", 2, False, True, dict(distributed_optimizer=True)),
    (2, 1, 2, "gpipe", None, True, False, dict(fused_loss=False, recompute="full",
                                               recompute_layers=2)),
    (1, 4, 1, "zbv", None, False, False, dict(recompute="selective")),
    (1, 2, 2, "zb-h1", None, False, False, dict(distributed_optimizer=True)),
    (2, 2, 1, "interleaved-zb", 2, True, True, dict(recompute="full")),
]


def _layout(tp, pp, dp, schedule, virtual, sp, **kw):
    return Layout(tp=tp, pp=pp, dp=dp, micro_batch_size=MICRO, seq_len=SEQ,
                  global_batch_size=GLOBAL * (2 if pp == 4 else 1), schedule=schedule,
                  virtual_stages=virtual, sequence_parallel=sp, dtype="fp32",
                  kernels="torch", **kw)


def _world(rank, world):
    results = []
    for tp, pp, dp, schedule, virtual, sp, tied, options in WORLD_LAYOUTS:
        cfg = CFG.replace(tie_embeddings=tied)
        layout = _layout(tp, pp, dp, schedule, virtual, sp, **options)
        ps = parallel.initialize(tp=tp, pp=pp, dp=dp)
        results.append(compare(cfg, layout, ps, measure(cfg, layout, ps)))
        parallel.destroy()
    return results


def test_predicted_memory_matches_measured_parts_on_six_layouts():
    results = run_world(4, _world, timeout=300)
    assert len(results) == 4 and all(len(r) == len(WORLD_LAYOUTS) for r in results)
    # the figures of docs/benchmarks.md (pytest -s prints them): bytes, predicted / measured
    print("\n| layout | rank | parameters | gradients | optimizer state | activations |")
    print("|---|---:|---:|---:|---:|---:|")
    for i, layout in enumerate(WORLD_LAYOUTS):
        name = _layout(*layout[:6], **layout[7]).describe() + (" tied" if layout[6] else "")
        for rank, res in enumerate(results):
            print(f"| {name} | {rank} | " + " | ".join(f"{p:,.0f} / {m:,}" for p, m in
                                                        res[i].values()) + " |")


def test_single_process_memory_and_saved_tensors_per_layer():
    # one process, 4 microbatches of GPipe: all live at the peak (and the unfused head)
    layout = _layout(1, 1, 1, "gpipe", None, False, fused_loss=False)
    compare(CFG, layout, ParallelState(), measure(CFG, layout, ParallelState()))
    # the itemized list of one layer = what saved-tensor hooks see for one layer's forward
    torch.manual_seed(0)
    model = GPT(CFG, state=ParallelState())
    x = model.embed_tokens(torch.randint(0, CFG.vocab_size, (MICRO, SEQ)))
    saved = SavedBytes(model)
    with saved.hooks():
        keep = model.layers["0"](x.detach().requires_grad_(), (model.rope_cos, model.rope_sin))
    predicted = saved_activation_bytes(CFG, MICRO, SEQ)
    assert saved.peak == predicted, (saved.peak, predicted)
    del keep
