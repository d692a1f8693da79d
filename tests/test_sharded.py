"""pacsrl.sharded: copies, saves and loads of the fixed reference whatever the sharding.

Two CPU processes (torchrun + gloo) shard a tiny model with FSDP2 (always) and DeepSpeed ZeRO-3 (when deepspeed
is installed, as the README's test command does) and compare with the unsharded model; the single-process
checks use plain modules."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pacsrl.sharded import copy_module, copy_tensors, full_state_dict, load_full_state_dict


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _net(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 7)).to(dtype)
    net.register_buffer("scale", torch.arange(3.0, dtype=dtype), persistent=False)
    return net


def test_plain_copy_keeps_the_targets_dtype_and_copies_buffers():
    src, dst = _net(0), _net(1, torch.bfloat16)
    src.scale.mul_(2)
    copy_module(src, dst)
    for k, v in src.state_dict().items():
        assert dst.state_dict()[k].dtype == torch.bfloat16
        assert torch.equal(dst.state_dict()[k], v.to(torch.bfloat16))
    assert torch.equal(dst.scale, torch.tensor([0.0, 2.0, 4.0]))  # a non-persistent buffer: value and dtype
    assert dst.scale.dtype == torch.float32


def test_full_state_dict_and_load_round_trip():
    src = _net(0)
    saved = full_state_dict(src)
    assert list(saved) == list(src.state_dict()) and all(v.device.type == "cpu" for v in saved.values())
    dst = _net(1)
    assert load_full_state_dict(dst, saved) == []
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
    saved["2.weight"].zero_()  # a copy, not a view of the model
    assert not torch.equal(src[2].weight, saved["2.weight"])


def test_mismatches_are_errors():
    with pytest.raises(ValueError, match="the two models differ"):
        copy_module(_net(0), torch.nn.Sequential(torch.nn.Linear(5, 3)))
    with pytest.raises(ValueError, match=r"shape \(3, 5\) into one of \(7, 3\)"):
        copy_tensors([(torch.zeros(3, 5), torch.zeros(7, 3))])
    weights = full_state_dict(_net(0))
    del weights["0.bias"]
    with pytest.raises(KeyError, match="missing.*0.bias"):
        load_full_state_dict(_net(1), weights)
    assert load_full_state_dict(_net(1), weights, strict=False) == ["0.bias"]
    weights["0.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"0.bias: the saved tensor has shape \(4,\), the model's \(3,\)"):
        load_full_state_dict(_net(1), weights)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp2", "zero3"])
def test_two_sharded_processes_match_the_unsharded_model(tmp_path, mode):
    if mode == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install --no-build-isolation deepspeed)")
    script = Path(__file__).with_name("sharded_script.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parent)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--master_port",
        _free_port(),
        "--nproc_per_node",
        "2",
        str(script),
        mode,
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        checks = json.loads((tmp_path / f"rank{rank}.json").read_text())
        names = {
            "sharded",
            "plain_to_sharded",
            "sharded_to_sharded",
            "to_bf16",
            "sharded_to_plain",
            "load",
            "keep",
        }
        if mode == "fsdp2":
            names |= {"forward", "meta_built", "meta_built_forward", "meta_built_resume_forward"}
        assert set(checks) == names and all(checks.values()), (rank, checks)


@pytest.mark.slow
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("mode", ["fsdp2", "zero3"])
def test_trainer_fixed_reference_under_sharding(tmp_path, mode, peft):
    """PACSTrainer with pacs_reference='fixed' (a model copy, or with LoRA a frozen adapter copy) on two CPU
    processes under FSDP2 (the FSDP settings of recipes/accelerate/fsdp2.yaml) or DeepSpeed ZeRO-3 (when deepspeed
    is installed): resets, checkpoint, resume and evaluation between steps, checked on the trainer's implicit-reward metrics by
    bench/sharded_reference.py (the GPU check runs it through the recipes' accelerate configs). Under FSDP2 the
    second process's weights are NaN until accelerate prepares the model, as cpu_ram_efficient_loading allows, so a
    full-model reference copied too early makes the run fail (with LoRA, accelerate's broadcast of the first
    process's state also repairs an early adapter copy)."""
    if mode == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install --no-build-isolation deepspeed)")
    script = Path(__file__).resolve().parents[1] / "bench" / "sharded_reference.py"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    world = 2
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--master_port",
        _free_port(),
        "--nproc_per_node",
        str(world),
        str(script),
        "--fsdp2-cpu" if mode == "fsdp2" else "--zero3",
        "--output",
        str(tmp_path),
    ]
    if peft:
        cmd.append("--peft")
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / f"sharded_reference_{mode}{'_peft' * peft}.json").read_text())
    assert result["sharding"] == mode and result["world"] == world and result["peft"] == peft
    assert result["all_ok"], result
    assert result["policy_sharded"] == [True] * world
    # with LoRA the reference is an adapter inside the (sharded) policy, there is no second model
    assert result["reference_sharded"] == [not peft] * world
    if mode == "fsdp2":
        assert result["nan_until_prepared"] == [False, True]
