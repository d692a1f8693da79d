"""Run by test_sharded.py under torchrun with 2 CPU processes (gloo): pacsrl.sharded on FSDP2 (``fsdp2``) or
DeepSpeed ZeRO-3 (``zero3``) sharded copies of a tiny Qwen2, checked against the plain, unsharded model.
Writes OUT/rank{R}.json: {check name: bool}."""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from cpu_sharding import exit_without_teardown, init_deepspeed_comm_on_cpu
from pacsrl.sharded import (
    copy_buffers,
    copy_module,
    full_state_dict,
    is_dtensor,
    is_zero3,
    load_full_state_dict,
)
from tiny import build_model, build_tokenizer

ZERO3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}


def main(mode: str, out_dir: str) -> None:
    if mode == "zero3":
        from transformers.integrations import HfDeepSpeedConfig

        init_deepspeed_comm_on_cpu()
        hf_ds_config = HfDeepSpeedConfig(ZERO3)  # noqa: F841 (kept alive: it turns on transformers' zero.Init)
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok = build_tokenizer()

    def sharded(seed, dtype=torch.float32, per_layer=False):
        if mode == "zero3":  # partitioned at construction, as transformers builds models under ZeRO-3
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_config(build_model(tok, seed=seed).config, dtype=dtype)
        from torch.distributed.fsdp import fully_shard

        model = build_model(tok, seed=seed).to(dtype)
        if per_layer:  # the policy as accelerate wraps it: each decoder layer, then the root
            for layer in model.model.layers:
                fully_shard(layer)
        fully_shard(model)
        return model

    def equal(got: dict, want: dict, dtype=None) -> bool:
        return list(got) == list(want) and all(
            torch.equal(got[k], want[k] if dtype is None else want[k].to(dtype)) for k in want
        )

    checks = {}
    plain = build_model(tok, seed=0)  # the reference values: an ordinary model
    want = {k: v.detach().clone() for k, v in plain.state_dict().items()}

    a = sharded(1, per_layer=True)
    b = sharded(2)
    checks["sharded"] = all(is_zero3(p) if mode == "zero3" else is_dtensor(p) for p in a.parameters())
    copy_module(plain, a)  # plain -> sharded (the reference is built from an unsharded policy)
    got = full_state_dict(a)
    checks["plain_to_sharded"] = equal(got, want) if rank == 0 else got == {}
    copy_module(a, b)  # sharded -> sharded, different wrapping (a reset)
    got = full_state_dict(b)
    checks["sharded_to_sharded"] = equal(got, want) if rank == 0 else got == {}
    c = sharded(3, dtype=torch.bfloat16)  # another dtype (ZeRO-3 partitions in its config's dtype, fp32 here)
    copy_module(a, c)
    got = full_state_dict(c)
    dtype = torch.bfloat16 if mode == "fsdp2" else torch.float32
    checks["to_bf16"] = (
        (equal(got, want, dtype) and all(v.dtype == dtype for v in got.values())) if rank == 0 else got == {}
    )
    back = build_model(tok, seed=4)  # sharded -> plain: every process gets the whole values
    copy_module(b, back)
    checks["sharded_to_plain"] = equal({k: v for k, v in back.state_dict().items()}, want)
    d = sharded(5)  # a checkpoint: whole tensors from disk on every process
    load_full_state_dict(d, want)
    got = full_state_dict(d)
    checks["load"] = equal(got, want) if rank == 0 else got == {}
    got = full_state_dict(d, keep=lambda name: ".mlp." in name)
    checks["keep"] = (
        (equal(got, {k: v for k, v in want.items() if ".mlp." in k}) and len(got) > 0)
        if rank == 0
        else got == {}
    )
    if mode == "fsdp2":  # the sharded model computes what the plain one does
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        with torch.no_grad():
            checks["forward"] = torch.allclose(
                b(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6
            )
        # the trainer's FSDP2 reference: built on the meta device, sharded, materialised empty, then copied
        from torch.distributed.fsdp import fully_shard
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        def meta_built():
            with no_init_weights(), torch.device("meta"):
                model = AutoModelForCausalLM.from_config(plain.config)
            model.tie_weights()
            fully_shard(model)
            return model.to_empty(device="cpu")

        m = meta_built()
        copy_module(a, m)  # the non-persistent buffers (rotary frequencies) come from the policy too
        got = full_state_dict(m)
        checks["meta_built"] = equal(got, want) if rank == 0 else got == {}
        with torch.no_grad():
            checks["meta_built_forward"] = torch.allclose(
                m(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6
            )
        # a resume: a meta-built reference loaded from a checkpoint, which holds no non-persistent buffers
        r = meta_built()
        load_full_state_dict(r, want)
        copy_buffers(a, r)
        with torch.no_grad():
            checks["meta_built_resume_forward"] = torch.allclose(
                r(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-6
            )
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(checks, f)
    dist.barrier()
    if mode == "zero3":
        exit_without_teardown(0)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
