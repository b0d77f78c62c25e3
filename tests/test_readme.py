"""The README's "Build your own model" snippet runs as written: in one process and on two."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _snippet() -> str:
    section = ROOT.joinpath("README.md").read_text().split("## Build your own model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_build_your_own_model_snippet_runs(tmp_path):
    script = tmp_path / "my_lm.py"
    script.write_text(_snippet())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGALITE_DEVICE": "cpu"}
    outputs = []
    for launch in ([sys.executable], [sys.executable, "-m", "torch.distributed.run",
                                      "--nproc-per-node", "2", "--master-port",
                                      str(_free_port())]):
        proc = subprocess.run(launch + [str(script)], cwd=tmp_path, env=env, text=True,
                              capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout)
    one, two = outputs
    loss = re.search(r"rank 0 of tp=1: loss (\d+\.\d{6})", one).group(1)
    assert "(4, 16, 256)" in one
    # At tp=2 both ranks print the single-process loss, and hold half the vocabulary.
    assert re.findall(r"rank \d of tp=2: loss (\d+\.\d{6})", two) == [loss, loss], two
    assert two.count("(4, 16, 128)") == 2, two
