"""QAT under torch.distributed on CPU (gloo, 2 processes, tiny model): DDP ranks stay
identical through the QAT switch; FSDP2 (``fully_shard``) trains to the same parameters as
DDP; convert + save on rank 0 gives a loadable artifact, byte-identical for the two."""

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


def _run_two_ranks(out: Path, mode: str) -> None:
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), mode], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=240) for p in procs]
    for p, (o, e) in zip(procs, results):
        assert p.returncode == 0, f"{mode} stdout:\n{o}\nstderr:\n{e[-3000:]}"
    assert [r[0].strip().splitlines()[-1] for r in results] == ["rank 0 ok", "rank 1 ok"]


def test_ddp_and_fsdp2_two_ranks_train_the_same_and_rank0_saves(tmp_path):
    for mode in ("ddp", "fsdp"):
        _run_two_ranks(tmp_path / mode, mode)
        ref = torch.load(tmp_path / f"reference-{mode}.pt")
        loaded = quantkit.load(tmp_path / mode)
        q = loaded.model.layers[1].mlp.gate_proj
        assert isinstance(q, IntKLinear) and q.state.grid == "seq" and q.state.bits == 2
        with torch.no_grad():
            assert torch.equal(loaded(ref["ids"]).logits, ref["logits"])
    # FSDP2's sharded training and DDP's replicated one reach the same weights (same data,
    # same averaged gradients), so the packed artifacts are the same bytes
    assert (tmp_path / "ddp" / "model.safetensors").read_bytes() == (tmp_path / "fsdp" / "model.safetensors").read_bytes()
