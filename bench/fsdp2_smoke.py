"""FSDP2 smoke run of the trainers, as run on an H200 (see bench/results/gpu/README.md): a 3-step training of a small
random Qwen2 (tied or untied embeddings) with PACS (pacs_reference old or fixed, reset every 2 steps) or TRL's GRPO,
optionally saving a checkpoint at step 2. Prints one line "DIAG <settings> ok|FAIL ...".

    ALGO=pacs REF=fixed TIE=1 SAVE=1 accelerate launch --config_file recipes/accelerate/fsdp2.yaml \
        --num_processes 1 bench/fsdp2_smoke.py
"""

import os
import sys
import traceback

import torch

sys.path.insert(0, "tests")
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl import GRPOConfig, GRPOTrainer

from pacsrl import PACSConfig, PACSTrainer
from tiny import build_tokenizer

algo, ref, tie = os.environ["ALGO"], os.environ.get("REF", "old"), os.environ.get("TIE", "1") == "1"


def every_third(completions, **kw):
    return [float(i % 3 == 0) for i in range(len(completions))]


tok = build_tokenizer()
torch.manual_seed(0)
model = Qwen2ForCausalLM(
    Qwen2Config(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=tie,
    )
)
ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"what is {i} + {i} ?"}]} for i in range(64)])
common = {
    "output_dir": "/tmp/diag",
    "per_device_train_batch_size": 8,
    "num_generations": 4,
    "max_completion_length": 16,
    "max_steps": 3,
    "report_to": [],
    "logging_steps": 1,
    "save_strategy": "steps" if os.environ.get("SAVE", "1") == "1" else "no",
    "save_steps": 2,
    "learning_rate": 1e-3,
    "bf16": torch.cuda.is_available(),
    "disable_tqdm": True,
}
tag = f"ALGO={algo} REF={ref} TIE={int(tie)} SAVE={os.environ.get('SAVE')}"
try:
    if algo == "grpo":
        tr = GRPOTrainer(
            model=model,
            reward_funcs=every_third,
            args=GRPOConfig(**common, beta=0.0),
            train_dataset=ds,
            processing_class=tok,
        )
    else:
        tr = PACSTrainer(
            model=model,
            reward_funcs=every_third,
            args=PACSConfig(**common, pacs_reference=ref, pacs_ref_reset_steps=2),
            train_dataset=ds,
            processing_class=tok,
        )
    tr.train()
    print(
        "DIAG",
        tag,
        "ok",
        tr.is_fsdp_enabled,
        [round(h.get("loss", -1), 4) for h in tr.state.log_history if "loss" in h],
    )
except Exception as e:  # noqa: BLE001 (a smoke test: report any failure of this combination, then go on)
    print("DIAG", tag, "FAIL", type(e).__name__, str(e)[:300])
    traceback.print_exc()
