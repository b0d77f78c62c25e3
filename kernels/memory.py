"""Peak memory of a function, on CUDA (the caching allocator's counters) or on the CPU.

The CPU has no allocator statistics, so there the profiler's memory events are replayed:
every allocation and free inside ``fn`` in time order, and the highest running total is the
peak. Both report bytes above what was allocated when ``fn`` started.
"""
import torch


def peak_bytes(fn, device="cpu") -> int:
    """Run ``fn()`` once and return the peak of bytes allocated while it ran."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The raw event list holds one "[memory]" record per allocation (+bytes) and free
    # (-bytes); the aggregated prof.events() folds most of them into their ops.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    total = peak = 0
    for _, delta in events:
        total += delta
        peak = max(peak, total)
    return peak
