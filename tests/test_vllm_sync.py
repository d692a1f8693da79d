"""What TRL sends to vLLM from a PACSTrainer with LoRA and the fixed reference.

``use_vllm`` itself needs vLLM and a GPU (neither is here), but the weight sync's walk over the parameters
(``VLLMGeneration._iter_named_params``: merge the adapter, rename, unmerge) is plain torch and PEFT. With
``pacs_reference="fixed"`` the policy holds a second, frozen adapter (``pacs_ref``); vLLM must receive the base
weights with the *trained* adapter merged, under the plain model's names, and nothing of the reference adapter."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from pacsrl import PACSConfig, PACSTrainer
from test_trainer import every_third
from tiny import build_model, build_tokenizer


def test_vllm_weight_sync_sends_the_trained_adapter_merged_and_not_the_reference(tmp_path):
    peft = pytest.importorskip("peft")
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    tok = build_tokenizer()
    plain = dict(build_model(tok, seed=0).named_parameters())  # the names and weights vLLM knows
    r, alpha = 4, 8
    trainer = PACSTrainer(
        model=build_model(tok, seed=0),
        reward_funcs=every_third,
        processing_class=tok,
        args=PACSConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=8,
            num_generations=4,
            report_to=[],
            use_cpu=True,
            pacs_reference="fixed",
            disable_tqdm=True,
        ),
        train_dataset=Dataset.from_list([{"prompt": "1+1="}] * 8),
        peft_config=peft.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    model = trainer.model
    torch.manual_seed(1)
    with torch.no_grad():  # a reference adapter unlike the trained one (as after a few steps)
        for name, param in model.named_parameters():
            if ".pacs_ref." in name:
                param.add_(torch.randn_like(param))
    params = {name: param.detach().clone() for name, param in model.named_parameters()}

    sync = object.__new__(VLLMGeneration)  # only the parameter walk: __init__ would start vLLM
    sync.model, sync.accelerator, sync._dist = (
        model,
        trainer.accelerator,
        DistributedBackend(trainer.accelerator),
    )
    sent = {name: tensor.detach().clone() for name, tensor in sync._iter_named_params()}

    assert set(sent) == set(plain)
    merged = 0
    for name, weight in plain.items():
        expected = weight.detach()
        if ".q_proj.weight" in name or ".v_proj.weight" in name:  # W + (alpha / r) B A of the trained adapter
            stem = "base_model.model." + name.removesuffix(".weight")
            lora_a, lora_b = params[f"{stem}.lora_A.default.weight"], params[f"{stem}.lora_B.default.weight"]
            expected = expected + (alpha / r) * lora_b @ lora_a
            merged += 1
        torch.testing.assert_close(sent[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    assert merged == 4  # two layers, q and v
    # the adapters are unmerged again afterwards: the model trains on as before
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), params[name], rtol=0, atol=1e-6, msg=name)
