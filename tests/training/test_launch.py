"""Launching as a user does, through torchrun: two "nodes" on one machine, and --layout auto.

Two torchrun processes with ``--nnodes 2 --node-rank 0/1`` and 2 workers each (rendezvous on
127.0.0.1) must train exactly as one torchrun of 4 workers with the same flags; both use
``--layout auto``, so the planner picks the layout of a 4-process world (and it must run).
"""
import json
import os
import socket
import subprocess
import sys

from megalite.training.layout_auto import CHOSEN_FLAGS

FLAGS = ["--model", "tiny", "--seq-len", "32", "--global-batch-size", "8", "--steps", "3",
         "--layout", "auto", "--log-interval", "1", "--seed", "3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cwd, launcher: list[str], metrics: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEGALITE_DEVICE": "cpu"}
    env.pop("MEGALITE_FAULT", None)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher,
                             "-m", "megalite.train", *FLAGS, "--metrics-out", metrics],
                            cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def _losses(path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(path)]


def test_two_nodes_train_like_one_and_layout_auto_runs(tmp_path):
    node_port, single_port = _free_port(), _free_port()
    nodes = [_torchrun(tmp_path, ["--nnodes", "2", "--node-rank", str(rank),
                                  "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                                  "--master-port", str(node_port)], "two_nodes.jsonl")
             for rank in (0, 1)]
    single = _torchrun(tmp_path, ["--nproc-per-node", "4", "--master-port", str(single_port)],
                       "one_node.jsonl")
    outs = [p.communicate(timeout=300)[0] for p in nodes + [single]]
    for p, out in zip(nodes + [single], outs):
        assert p.returncode == 0, out[-4000:]
    # The planner's choice is printed once per launch (global rank 0), with its flags.
    chosen = [line for out in outs for line in out.splitlines()
              if line.startswith("--layout auto: ")]
    assert len(chosen) == 2 and chosen[0] == chosen[1], chosen
    running = chosen[0].split("; running ")[1].split()
    assert running[:2] == ["--tp", running[1]] and set(running) & set(CHOSEN_FLAGS)
    tp, pp = int(running[1]), int(running[running.index("--pp") + 1])
    assert 4 % (tp * pp) == 0
    assert f"tp={tp} pp={pp} dp={4 // (tp * pp)}" in outs[0] + outs[1]
    two, one = _losses(tmp_path / "two_nodes.jsonl"), _losses(tmp_path / "one_node.jsonl")
    assert len(one) == 3 and two == one, (two, one)
