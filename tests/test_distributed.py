"""Two CPU processes (torchrun + gloo) train PACS with whole groups on each process, with DDP, FSDP2 and (when
deepspeed is installed) DeepSpeed ZeRO-3."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_sharded import _free_port

_RUNS: dict[tuple[str, str], list[dict]] = {}


def _train(sharding: str, skip_rank0: str, out: Path) -> list[dict]:
    """Both processes' records of one 2-process run, cached so the sharded runs can be compared with DDP."""
    if (sharding, skip_rank0) not in _RUNS:
        script = Path(__file__).with_name("dist_train_script.py")
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(script.parent),
            "SKIP_RANK0": skip_rank0,
            "SHARDING": sharding,
        }
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            _free_port(),
            str(script),
            str(out),
        ]
        proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        _RUNS[sharding, skip_rank0] = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return _RUNS[sharding, skip_rank0]


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp2", "zero3"])
@pytest.mark.parametrize("skip_rank0", ["0", "1"])
def test_two_processes_keep_groups_whole_and_train(tmp_path_factory, skip_rank0, sharding):
    # skip_rank0="1": every group of process 0 has equal labels, so on-policy it skips them all and must still
    # join the collectives (DDP's gradient all-reduce; FSDP2's all-gathers in the forward and reduce-scatters in the
    # backward; ZeRO-3's parameter all-gathers) with a zero-weighted forward/backward, or process 1 would hang
    if sharding == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install --no-build-isolation deepspeed)")
    ranks = _train(sharding, skip_rank0, tmp_path_factory.mktemp(f"{sharding}-{skip_rank0}"))
    for data in ranks:
        assert data["world"] == 2 and data["sharding"] == sharding
        if sharding == "ddp":
            assert data["local_fraction"] == 1.0
        else:  # really sharded: each process holds about half of the elements
            assert 0.3 < data["local_fraction"] < 0.7, data["local_fraction"]
        assert data["changed"], "parameters did not change on this process"
        assert len(data["seen"]) == 3
        for batch in data["seen"]:
            ids, prompts = batch["group_ids"], batch["prompts"]
            for g in range(0, len(ids), 4):
                assert len(set(ids[g : g + 4])) == 1  # one group id per block of 4 rows
                assert all(p == prompts[g] for p in prompts[g : g + 4])  # ... and one prompt
        assert all(not math.isnan(v) for h in data["logs"] for v in h.values() if isinstance(v, float))
    # different prompts on the two processes
    for step in range(3):
        p0 = {tuple(p) for p in ranks[0]["seen"][step]["prompts"]}
        p1 = {tuple(p) for p in ranks[1]["seen"][step]["prompts"]}
        assert not (p0 & p1)
    # metrics are reduced across processes: both ranks log the same PACS loss
    assert [h["pacs/loss"] for h in ranks[0]["logs"]] == [h["pacs/loss"] for h in ranks[1]["logs"]]
    if skip_rank0 == "1":
        assert ranks[0]["logs"][0]["pacs/skipped_groups"] == 1.0  # rank 0's one group, summed over processes
    if sharding == "ddp":
        # gradients synchronised: identical parameters on both processes after training
        assert ranks[0]["params"] == ranks[1]["params"]
    else:
        # the sharded run trains the same model as DDP (same data, fp32): equal parameters up to float rounding
        # (gathered from the shards, so equal on both processes by construction) and equal gradient norms
        ddp = _train("ddp", skip_rank0, tmp_path_factory.mktemp(f"ddp-{skip_rank0}"))
        assert len(ranks[0]["params"]) == len(ddp[0]["params"])
        assert max(abs(a - b) for a, b in zip(ranks[0]["params"], ddp[0]["params"])) < 1e-4
        norms = [h["grad_norm"] for h in ranks[0]["logs"]], [h["grad_norm"] for h in ddp[0]["logs"]]
        assert norms[0] == pytest.approx(norms[1], rel=1e-4)
