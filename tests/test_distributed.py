"""Two CPU processes (torchrun + gloo) train PACS with whole groups on each process, with DDP, FSDP2 and (when
deepspeed is installed) DeepSpeed ZeRO-3."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_sharded import _free_port


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp2", "zero3"])
@pytest.mark.parametrize("skip_rank0", ["0", "1"])
def test_two_processes_keep_groups_whole_and_train(tmp_path, skip_rank0, sharding):
    # skip_rank0="1": every group of process 0 has equal labels, so on-policy it skips them all and must still
    # join the collectives (DDP's gradient all-reduce; FSDP2's all-gathers in the forward and reduce-scatters in the
    # backward; ZeRO-3's parameter all-gathers) with a zero-weighted forward/backward, or process 1 would hang
    if sharding == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install --no-build-isolation deepspeed)")
    script = Path(__file__).with_name("dist_train_script.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parent),
           "SKIP_RANK0": skip_rank0, "SHARDING": sharding}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for data in ranks:
        assert data["world"] == 2 and data["sharding"] == sharding
        assert data["changed"], "parameters did not change on this process"
        assert len(data["seen"]) == 3
        for batch in data["seen"]:
            ids, prompts = batch["group_ids"], batch["prompts"]
            for g in range(0, len(ids), 4):
                assert len(set(ids[g:g + 4])) == 1  # one group id per block of 4 rows
                assert all(p == prompts[g] for p in prompts[g:g + 4])  # ... and one prompt
        assert all(all(v == v for v in h.values() if isinstance(v, float)) for h in data["logs"])  # no NaN
    # different prompts on the two processes, and gradients synchronised: identical parameters after training
    for step in range(3):
        p0 = {tuple(p) for p in ranks[0]["seen"][step]["prompts"]}
        p1 = {tuple(p) for p in ranks[1]["seen"][step]["prompts"]}
        assert not (p0 & p1)
    assert ranks[0]["params"] == ranks[1]["params"]
    # metrics are reduced across processes: both ranks log the same PACS loss
    assert [h["pacs/loss"] for h in ranks[0]["logs"]] == [h["pacs/loss"] for h in ranks[1]["logs"]]
    if skip_rank0 == "1":
        assert ranks[0]["logs"][0]["pacs/skipped_groups"] == 1.0  # rank 0's one group, summed over processes
