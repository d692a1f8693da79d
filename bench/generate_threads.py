"""Wall time of the demo model's sampling with a given number of torch threads (README, "Timing on a busy machine").

    python bench/generate_threads.py 2                           # OpenMP's default wait policy
    OMP_WAIT_POLICY=PASSIVE python bench/generate_threads.py 2   # idle OpenMP threads sleep
    python bench/generate_threads.py 1

Samples 3 x 64 chain_sum prompts x 40 new tokens from the shipped demo model and prints the wall time and the
1-minute load average. Compare the settings on a busy machine, one after the other.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pacsrl.demo import demo_checkpoint_path


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    torch.set_num_threads(threads)
    path = demo_checkpoint_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    messages = [
        [
            {
                "role": "user",
                "content": "State the final answer to the following arithmetic problem: "
                f"{i % 10} + {(i * 3) % 10} - {(i * 7) % 10} = Put the final answer in <answer></answer>.",
            }
        ]
        for i in range(64)
    ]
    batch = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True
    )
    torch.manual_seed(0)
    start = time.perf_counter()
    for _ in range(3):
        with torch.no_grad():
            model.generate(
                **batch,
                max_new_tokens=40,
                do_sample=True,
                temperature=1.0,
                pad_token_id=tokenizer.pad_token_id,
            )
    print(
        f"threads={threads} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')} "
        f"wall={time.perf_counter() - start:.1f}s load={os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
