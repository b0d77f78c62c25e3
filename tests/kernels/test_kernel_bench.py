"""The benchmark script's plumbing, on the CPU (GPU timings need a CUDA machine)."""
import json

import numpy as np
import pytest
import torch

from megalite.kernels import bench
from megalite.kernels._bench_cases import OPS, cases


@pytest.mark.parametrize("op", OPS)
def test_bench_providers_run_and_agree(op, monkeypatch):
    # The interpreter runs the "triton" provider, so every case's lambdas are exercised.
    def run(fn, grads_to_none):  # call once: this checks plumbing, not speed
        fn()
        return 1.0, 0.0
    case = cases(op, "cpu", torch.float32, quick=True)[0]
    assert set(case.work) == set(bench.MODES)
    ours = "fused" if "fused" in case.providers else "triton"
    if ours == "fused":  # its CPU size (V = 8192) is for the memory figure: torch chunk path
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    outs = {}
    for name in (ours, "torch"):
        for mode in bench.MODES:
            ms, spread, peak = bench.measure(case, name, case.providers[name], mode, run,
                                             "cpu")
            assert ms > 0 and spread == 0.0
            assert (peak is not None) == (case.measure_memory and mode == "fwd+bwd")
        torch.manual_seed(0)
        outs[name] = case.providers[name](*case.make_inputs()).detach()
    torch.testing.assert_close(outs[ours], outs["torch"], atol=1e-3, rtol=1e-3)


def test_bench_main_without_cuda_exits_zero(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CPU path only")
    assert bench.main(["rms_norm", "cross_entropy", "--out", str(tmp_path)]) == 0
    assert "No CUDA device" in capsys.readouterr().out
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {r["op"] for r in rows} == {"rms_norm", "cross_entropy"}
    assert all({"op", "provider", "shape", "dtype", "ms", "device", "torch"} <= set(r)
               for r in rows)
    assert (tmp_path / "rms_norm.png").exists()
    assert all("spread_pct" in r for r in rows)


def test_cpu_timer_reports_the_median_and_spread_of_its_timed_calls(monkeypatch):
    """The real CPU timer (not a stand-in) on a fake clock that each call advances by a
    known time: one untimed warm-up call, then the median of five timed calls and their
    20-80 percentile spread relative to it (numpy's "weibull" percentiles, statistics'
    default "exclusive" method, as the reference)."""
    clock = [0.0]
    durations_ms = iter([9.0, 1.0, 2.0, 10.0, 3.0, 4.0])  # the first call is the warm-up

    def fn():
        clock[0] += next(durations_ms) / 1e3
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    ms, spread = bench.timer("cpu")(fn, None)
    samples = [1.0, 2.0, 10.0, 3.0, 4.0]
    p20, p80 = np.percentile(samples, [20, 80], method="weibull")
    assert ms == pytest.approx(np.median(samples))
    assert spread == pytest.approx((p80 - p20) / np.median(samples))
