"""QAT under DistributedDataParallel: 2 CPU processes (gloo) on a tiny model stay identical
through the QAT switch, and convert + save on rank 0 gives a loadable artifact."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

import quantkit
from quantkit.nn import IntKLinear

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_identical_and_rank0_saves(tmp_path):
    out = tmp_path / "artifact"
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=240) for p in procs]
    for p, (o, e) in zip(procs, results):
        assert p.returncode == 0, f"stdout:\n{o}\nstderr:\n{e[-3000:]}"
    assert [r[0].strip().splitlines()[-1] for r in results] == ["rank 0 ok", "rank 1 ok"]
    ref = torch.load(tmp_path / "reference.pt")
    loaded = quantkit.load(out)
    q = loaded.model.layers[1].mlp.gate_proj
    assert isinstance(q, IntKLinear) and q.state.grid == "seq" and q.state.bits == 2
    with torch.no_grad():
        assert torch.equal(loaded(ref["ids"]).logits, ref["logits"])
