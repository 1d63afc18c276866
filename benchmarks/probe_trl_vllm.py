"""Probe: can ``drift online`` generate through TRL's vLLM integration on vLLM's CPU build?

Issue 29 step 6. Builds TRL's ``GRPOTrainer`` with ``use_vllm=True, vllm_mode="colocate"`` on the
CPU and runs one optimizer step, in one of three modes:

* ``plain``: TRL's own single-turn generation;
* ``rollout``: a ``rollout_func`` that generates through ``trainer.vllm_generation`` (the route
  drift's multi-turn ``ProtocolRollout`` would take);
* ``rollout_nosync``: the same, with TRL's first weight sync skipped, to see whether generation
  itself works (it would sample from the initial weights: not online RL, a diagnosis only).

Run (one vLLM start each, 20-60 s on 2 cores; ``--smollm2`` for SmolLM2-135M, else the tiny model):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/probe_trl_vllm.py plain [--smollm2]

Prints ``TRAINED <mode>`` on success; otherwise the traceback. Results: docs/operations.md
("Online RL with vLLM").
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model must never wait on the network
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["plain", "rollout", "rollout_nosync"])
    parser.add_argument(
        "--smollm2", action="store_true", help="SmolLM2-135M-Instruct instead of the tiny model"
    )
    args = parser.parse_args()

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from tasks.models import materialize_smollm2, materialize_tiny

    path = str(materialize_smollm2() if args.smollm2 else materialize_tiny())
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{i} + 1 ="}]} for i in range(2)])

    def length_reward(prompts, completions, **_) -> list[float]:
        return [float(len(str(c))) for c in completions]

    def rollout_func(prompts, trainer) -> dict:
        tokenizer = trainer.processing_class
        ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in prompts]
        ids = [list(i["input_ids"]) if hasattr(i, "keys") else list(i) for i in ids]
        prompt_ids, completion_ids, logprobs, _ = trainer.vllm_generation.generate(ids, None, 1)
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": [[lp[0] for lp in row] for row in logprobs],
        }

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="probe-trl-vllm-"),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.3,
        vllm_max_model_length=256,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    started = time.perf_counter()
    trainer = GRPOTrainer(
        model=path,
        reward_funcs=[length_reward],
        args=config,
        train_dataset=dataset,
        **({"rollout_func": rollout_func} if args.mode != "plain" else {}),
    )
    print(f"trainer built in {time.perf_counter() - started:.1f} s", flush=True)
    if args.mode == "rollout_nosync":
        trainer._last_loaded_step = 0  # TRL syncs when global_step differs: skip step 0's sync
    trainer.train()
    print(f"TRAINED {args.mode} in {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
