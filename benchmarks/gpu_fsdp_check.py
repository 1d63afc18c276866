"""FSDP check on one GPU: drift's trainer launched with ``configs/accelerate/fsdp.yaml`` against the
same run in one plain process, plus a kill and resume from an FSDP (sharded) checkpoint.

    python benchmarks/gpu_fsdp_check.py [--json OUT]

Model: a randomly initialised SmolLM2-135M-shaped model with the tokenizer carried in
``benchmarks/assets/smollm2-tokenizer`` (no hub access needed). Data: 96 weighted multi-turn
trajectories written as JSONL (the trainer reads JSONL, so neither polars nor Prefect is needed on
the GPU machine; pydantic is). Runs, each ``python -m tasks.trainer`` with the same settings:

1. ``plain``: one process, no accelerate config (bf16 autocast on the GPU);
2. ``fsdp``: ``accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1``
   (FSDP2 wraps the decoder layers; bf16 parameters in compute, fp32 master weights);
3. ``fsdp-killed`` + ``fsdp-resumed``: the FSDP run SIGKILLed after step 4 (sharded checkpoint at
   step 3), then started again: it must resume from step 3 and end like run 2.

Reported: each run's loss by step, tokens/s, wall time, whether FSDP was applied (the trainer logs
the strategy), the largest weight difference plain vs fsdp and fsdp vs resumed, and whether the
saved FSDP model loads with ``from_pretrained``. On a CPU the same script runs (accelerate does not
apply FSDP there; the trainer says so), which is how it was tested before it went to a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "benchmarks" / "assets" / "smollm2-tokenizer"
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def write_model(path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    for f in ASSETS.iterdir():
        shutil.copy(f, path / f.name)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).save_pretrained(path)


def write_data(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            a, b = 3 * i + 2, 7 * i + 1
            msgs = [SYSTEM, {"role": "user", "content": f"What is {a} + {b}? Answer in <answer></answer>."}]
            for wrong in range(i % 3):  # 0-2 wrong tries with feedback, then the right answer
                msgs += [
                    {"role": "assistant", "content": f"<answer>{a + b + wrong + 1}</answer>"},
                    {"role": "user", "content": "Incorrect. Please think again."},
                ]
            msgs.append({"role": "assistant", "content": f"<answer>{a + b}</answer>"})
            row = {
                "prompt_id": f"p{i // 4:03d}",
                "traj_idx": i % 4,
                "messages": msgs,
                "weight": 0.25 + (i % 5) / 4,
            }
            f.write(json.dumps(row) + "\n")


def trainer(
    name: str, work: Path, model: Path, data: Path, accelerate_config: str | None, extra: list[str]
) -> dict:
    out, ck, result = (
        work / name / "model",
        work / "ck-fsdp" if accelerate_config else work / name / "ck",
        work / name / "result.json",
    )
    args = [
        "--data", str(data), "--model", str(model), "--config", str(work / "train.json"),
        "--output", str(out), "--checkpoints", str(ck), "--result", str(result), "--no-progress", *extra,
    ]  # fmt: skip
    if accelerate_config:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
               "--num_processes", "1", "--num_machines", "1", "--module", "tasks.trainer", *args]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "tasks.trainer", *args]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    rec = {
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "fsdp_applied": "training with FSDP" in log,
        "fsdp_not_applied_warning": "applies it to GPU process groups only" in log,
    }
    if result.exists():
        r = json.loads(result.read_text())
        rec.update(
            loss=[round(x[1], 5) for x in r["loss_history"]],
            tokens_per_s=round(r["tokens_per_s"]),
            resumed_from_step=r["resumed_from_step"],
        )
    elif "--kill-after-step" not in extra:
        rec["log_tail"] = log[-4000:]
    print(f"[fsdp-check] {name}: {rec}", flush=True)
    return rec


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys(), sorted(set(wa) ^ set(wb))
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="drift-fsdp-check-"))
    try:
        model = work / "model"
        model.mkdir()
        write_model(model)
        data = work / "data.jsonl"
        write_data(data, args.rows)
        train_cfg = {"learning_rate": 1e-4, "batch_size": 8, "grad_accum": 2, "max_steps": args.steps,
                     "max_seq_len": 512, "checkpoint_every": 3, "precision": "auto"}  # fmt: skip
        (work / "train.json").write_text(json.dumps(train_cfg))
        fsdp_yaml = str(ROOT / "configs" / "accelerate" / "fsdp.yaml")
        info: dict = {
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "train": train_cfg,
            "rows": args.rows,
        }
        import transformers

        info["transformers"] = transformers.__version__
        runs = {
            "plain": trainer("plain", work, model, data, None, []),
            "fsdp": trainer("fsdp", work, model, data, fsdp_yaml, []),
        }
        shutil.rmtree(work / "ck-fsdp", ignore_errors=True)  # the killed run starts from nothing
        runs["fsdp-killed"] = trainer("fsdp-killed", work, model, data, fsdp_yaml, ["--kill-after-step", "4"])
        runs["fsdp-resumed"] = trainer("fsdp-resumed", work, model, data, fsdp_yaml, [])
        info["runs"] = runs
        ok = all(
            (work / n / "model" / "model.safetensors").exists() for n in ("plain", "fsdp", "fsdp-resumed")
        )
        if ok:
            info["max_abs_weight_diff_plain_vs_fsdp"] = max_weight_diff(
                work / "plain" / "model", work / "fsdp" / "model"
            )
            info["max_abs_weight_diff_fsdp_vs_resumed"] = max_weight_diff(
                work / "fsdp" / "model", work / "fsdp-resumed" / "model"
            )
            from transformers import AutoModelForCausalLM

            loaded = AutoModelForCausalLM.from_pretrained(work / "fsdp" / "model")
            info["fsdp_model_loads"] = sum(p.numel() for p in loaded.parameters())
        print(json.dumps(info, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(info, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
