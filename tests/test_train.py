"""Training stage: learning, data handling, output format, LoRA merge, resume after SIGKILL, and a
2-process torchrun (gloo, CPU) run that must match the single-process run. Tiny model, few steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from drift_core.schemas import LoraConfig, ModelConfig, TrainConfig
from tasks.trainer import TrainResult, train_weighted_sft

REPO = Path(__file__).resolve().parents[1]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def make_data(n: int = 8, n_zero: int = 0) -> pl.DataFrame:
    """n trajectories with positive weights (some multi-turn) plus n_zero with weight 0."""
    rows = []
    for i in range(n + n_zero):
        a, b = i + 2, 3 * i + 1
        msgs = [SYSTEM, {"role": "user", "content": f"What is {a} + {b}? Answer in <answer></answer>."}]
        if i % 3 == 0:  # a wrong first try, feedback, then the right answer
            msgs += [
                {"role": "assistant", "content": f"<answer>{a + b + 1}</answer>"},
                {"role": "user", "content": "Incorrect. Please think again."},
            ]
        msgs.append({"role": "assistant", "content": f"<answer>{a + b}</answer>"})
        weight = 0.0 if i >= n else 0.5 + (i % 4) * 0.25
        rows.append({"prompt_id": f"p{i // 2}", "traj_idx": i % 2, "messages": msgs, "weight": weight})
    return pl.DataFrame(rows)


def cfg_for(**kw) -> TrainConfig:
    base = {
        "learning_rate": 1e-3,
        "batch_size": 4,
        "max_steps": 4,
        "max_seq_len": 256,
        "checkpoint_every": 1000,
    }
    return TrainConfig(**{**base, **kw})


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float) -> float:
    wa, wb = weights_of(a), weights_of(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= atol, f"max |diff| {worst:.3g} > {atol}"
    return worst


def run(tiny_model_dir, data, cfg, out: Path, ck: Path, **kw) -> TrainResult:
    return train_weighted_sft(
        data, str(tiny_model_dir), ModelConfig(path=str(tiny_model_dir)), cfg, out, ck, progress=False, **kw
    )


def cli(args: list[str], nproc: int = 1, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable, "-m", "tasks.trainer"]
    if nproc > 1:
        prefix = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
        ]
        prefix += ["-m", "tasks.trainer"]
    return subprocess.run(prefix + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def cli_args(data: Path, model: Path, cfg: TrainConfig, tmp: Path, out: Path, ck: Path) -> list[str]:
    (tmp / "train.json").write_text(cfg.model_dump_json())
    return [
        "--data", str(data), "--model", str(model), "--config", str(tmp / "train.json"),
        "--output", str(out), "--checkpoints", str(ck), "--no-progress",
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tiny model gains nothing from more, and on a busy 2-core machine
    OpenMP threads contend (10x slower steps)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """10 steps over the same 4 rows (the whole data set is one batch) + 2 zero-weight rows."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = cfg_for(max_steps=10, batch_size=4)
    result = run(tiny_model_dir, make_data(4, n_zero=2), cfg, tmp / "out", tmp / "ck")
    return result, tmp / "out"


def test_loss_decreases(trained):
    result, _ = trained
    losses = [loss for _, loss, _ in result.loss_history]
    assert [s for s, _, _ in result.loss_history] == list(range(1, 11))
    assert result.steps == 10 and result.final_loss == losses[-1]
    assert all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)), losses  # same batch every step
    assert losses[-1] < losses[0] - 0.5, losses
    lrs = [lr for _, _, lr in result.loss_history]
    assert lrs[0] == pytest.approx(1e-3) and lrs == sorted(lrs, reverse=True)  # linear decay, no warmup
    assert result.tokens > 0 and result.tokens_per_s > 0 and result.resumed_from_step is None


def test_zero_weight_rows_dropped(trained):
    result, _ = trained
    assert result.examples == 4 and result.dropped_zero_weight == 2
    assert result.samples == 10 * 4  # 10 steps of the 4 positive-weight rows


def test_output_is_a_plain_safetensors_model(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, out = trained
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert model.config.use_cache
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    log = json.loads((out / "training_log.json").read_text())
    assert [tuple(h) for h in log["loss_history"]] == [tuple(h) for h in result.loss_history]
    base = weights_of(Path(tiny_model_dir))
    assert any(not torch.equal(base[k], v) for k, v in weights_of(out).items())  # it did train


def test_lora_with_checkpointing_saves_merged_plain_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = cfg_for(
        max_steps=2,
        lora=LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        gradient_checkpointing=True,
    )
    run(tiny_model_dir, make_data(8), cfg, tmp_path / "out", tmp_path / "ck")
    out = tmp_path / "out"
    assert not (out / "adapter_config.json").exists()
    base, merged = weights_of(Path(tiny_model_dir)), weights_of(out)
    assert merged.keys() == base.keys()  # no lora_A/lora_B keys: a plain model
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed), changed
    AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)


def test_resume_after_sigkill_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    data = make_data(10)
    data.write_parquet(tmp_path / "data.parquet")
    cfg = cfg_for(max_steps=5, batch_size=3, grad_accum=2, checkpoint_every=2, warmup_ratio=0.2)

    # a real process, SIGKILLed by itself after step 3 (checkpoint of step 2 on disk, step 3 lost)
    ck = tmp_path / "ck"
    args = cli_args(tmp_path / "data.parquet", tiny_model_dir, cfg, tmp_path, tmp_path / "killed", ck)
    proc = cli([*args, "--kill-after-step", "3"])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [p.name for p in ck.iterdir()] == ["step-00000002"]
    assert not (tmp_path / "killed").exists()

    resumed = run(tiny_model_dir, data, cfg, tmp_path / "resumed", ck)
    straight = run(tiny_model_dir, data, cfg, tmp_path / "straight", tmp_path / "ck2")
    assert resumed.resumed_from_step == 2 and straight.resumed_from_step is None
    assert [h[0] for h in resumed.loss_history] == [1, 2, 3, 4, 5]
    for a, b in zip(resumed.loss_history, straight.loss_history, strict=True):
        assert a[1] == pytest.approx(b[1], abs=1e-6) and a[2] == pytest.approx(b[2])
    assert_same_weights(tmp_path / "resumed", tmp_path / "straight", atol=1e-6)


def test_checkpoint_of_another_run_is_not_resumed(tiny_model_dir, tmp_path):
    ck = tmp_path / "ck"
    cfg = cfg_for(max_steps=3, checkpoint_every=1)
    run(tiny_model_dir, make_data(8), cfg, tmp_path / "a", ck)
    assert [p.name for p in ck.iterdir()] == ["step-00000002"]  # only the latest is kept
    other = run(tiny_model_dir, make_data(8), cfg.model_copy(update={"seed": 1}), tmp_path / "b", ck)
    assert other.resumed_from_step is None


def test_train_task_publishes_and_reuses(tiny_model_dir, tmp_path, monkeypatch):
    import tasks.train as train_mod
    from tasks.store import ArtifactStore

    store = ArtifactStore(str(tmp_path / "store"))
    weighted = store.write_parquet(make_data(6, n_zero=1), "weights", "w1")
    model_cfg = ModelConfig(path=str(tiny_model_dir))
    cfg = cfg_for(max_steps=2, checkpoint_every=1)
    manifest = train_mod.train.fn(weighted, model_cfg, cfg, store.url, "t1")
    assert manifest.stage == "train" and manifest.rows == 6 and store.find("train", "t1") == manifest
    assert {"final_loss", "steps", "tokens_per_s", "seconds", "loss_history"} <= manifest.meta.keys()
    assert (Path(manifest.uri) / "model.safetensors").exists()
    assert not train_mod.checkpoint_dir_for(store, "t1").exists()  # spent once the model is published

    def boom(*a, **k):
        raise AssertionError("a published model must be reused, not retrained")

    monkeypatch.setattr("tasks.trainer.train_weighted_sft", boom)
    assert train_mod.train.fn(weighted, model_cfg, cfg, store.url, "t1") == manifest


#: multi-process vs single-process weights differ by float summation order only; measured largest
#: |diff| 2.7e-7 (normalize: mean), 8.2e-7 (weight_sum). The bound docs/operations.md states.
DDP_ATOL = 2e-6


def assert_two_ranks_ran(ranks: list[list], launcher_module: str) -> None:
    """Ranks 0 and 1 joined the process group (each reported its rank and pid through it), as two
    processes other than this one, both started by ``launcher_module``."""
    assert sorted(r for r, _, _ in ranks) == [0, 1], ranks
    pids = {p for _, p, _ in ranks}
    assert len(pids) == 2 and os.getpid() not in pids, ranks
    assert all(parent == f"-m {launcher_module}" for _, _, parent in ranks), ranks


@pytest.mark.slow  # ~17-25 s (two fresh interpreters importing torch + transformers)
def test_two_process_torchrun_matches_single_process(tiny_model_dir, tmp_path):
    """The Prefect task with num_processes=2 runs `torchrun -m tasks.trainer` (gloo on the CPU).

    11 rows, global micro-batch 5 (ranks get 3 + 2 samples, the epoch's last batch 1 + a zero-weight
    placeholder), 2 micro-batches per step: the per-rank loss scaling must turn DDP's gradient average
    into the single-process objective. ``normalize: mean`` here; ``weight_sum``, whose scaling
    divides by the weight summed over all ranks, in the accelerate test below (the same trainer)."""
    normalize = "mean"
    from tasks.store import ArtifactStore
    from tasks.train import train

    data = make_data(11)
    store = ArtifactStore(str(tmp_path / "store"))
    weighted = store.write_parquet(data, "weights", "w")
    cfg = cfg_for(max_steps=4, batch_size=5, grad_accum=2, normalize=normalize)
    ddp = train.fn(weighted, ModelConfig(path=str(tiny_model_dir)), cfg, store.url, "ddp", num_processes=2)
    assert_two_ranks_ran(ddp.meta["ranks"], "torch.distributed.run")

    single = run(tiny_model_dir, data, cfg, tmp_path / "single", tmp_path / "ck1")
    assert ddp.meta["steps"] == single.steps == 4
    for a, b in zip(ddp.meta["loss_history"], single.loss_history, strict=True):
        assert a[1] == pytest.approx(b[1], rel=1e-5)
    assert_same_weights(Path(ddp.uri), tmp_path / "single", atol=DDP_ATOL)


@pytest.mark.slow  # ~20 s: `accelerate launch` starting two interpreters
def test_accelerate_config_launches_through_accelerate(tiny_model_dir, tmp_path):
    """`train.accelerate_config` runs `accelerate launch --config_file ... -m tasks.trainer`. On the
    CPU accelerate does not apply FSDP (GPU process groups only), so the 2 processes train as a gloo
    group: the launcher plumbing (config file, process count, result hand-back) is what runs here,
    and the result must equal the single-process run, under ``normalize: weight_sum`` (the torchrun
    test covers ``mean``). FSDP itself: benchmarks/gpu_check.py."""
    from tasks.store import ArtifactStore
    from tasks.train import train

    data = make_data(11)
    store = ArtifactStore(str(tmp_path / "store"))
    weighted = store.write_parquet(data, "weights", "w")
    cfg = cfg_for(
        max_steps=3,
        batch_size=5,
        grad_accum=2,
        normalize="weight_sum",
        accelerate_config="configs/accelerate/fsdp.yaml",
    )
    launched = train.fn(
        weighted, ModelConfig(path=str(tiny_model_dir)), cfg, store.url, "acc", num_processes=2
    )
    assert_two_ranks_ran(launched.meta["ranks"], "accelerate.commands.launch")
    assert launched.meta["accelerate_config"] == "fsdp.yaml"

    single = run(
        tiny_model_dir,
        data,
        cfg.model_copy(update={"accelerate_config": None}),
        tmp_path / "s",
        tmp_path / "ck",
    )
    for a, b in zip(launched.meta["loss_history"], single.loss_history, strict=True):
        assert a[1] == pytest.approx(b[1], rel=1e-5)
    assert_same_weights(Path(launched.uri), tmp_path / "s", atol=DDP_ATOL)


def test_launch_command_per_setting(tmp_path):
    from tasks.train import launch_command

    args = ["--data", "d.parquet"]
    assert launch_command(cfg_for(), 1, args) is None  # in-process
    torchrun = launch_command(cfg_for(), 4, args)
    assert torchrun[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m"]
    assert torchrun[7:] == ["tasks.trainer", *args]
    acc = launch_command(cfg_for(accelerate_config="configs/accelerate/deepspeed_zero3.yaml"), 1, args)
    assert acc[1:3] == ["-m", "accelerate.commands.launch"]
    assert acc[acc.index("--config_file") + 1] == str(REPO / "configs/accelerate/deepspeed_zero3.yaml")
    assert acc[acc.index("--num_processes") + 1] == "1"
    assert acc[acc.index("--module") + 1 :] == ["tasks.trainer", *args]
    with pytest.raises(FileNotFoundError, match=r"train.accelerate_config: 'nope.yaml' is not a file"):
        launch_command(cfg_for(accelerate_config="nope.yaml"), 2, args)


@pytest.mark.parametrize(
    ("name", "kind", "key", "value"),
    [
        ("fsdp.yaml", "FSDP", "fsdp_version", 2),
        ("fsdp_offload.yaml", "FSDP", "fsdp_offload_params", True),
        ("deepspeed_zero2.yaml", "DEEPSPEED", "zero_stage", 2),
        ("deepspeed_zero3.yaml", "DEEPSPEED", "zero3_save_16bit_model", True),
    ],
)
def test_shipped_accelerate_configs_parse(name, kind, key, value):
    """accelerate's own loader accepts every shipped config (unknown keys would fail here)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / "configs" / "accelerate" / name))
    assert cfg.distributed_type.value == kind
    assert (cfg.fsdp_config or cfg.deepspeed_config)[key] == value


def test_jsonl_training_data_reads_like_parquet(tmp_path):
    """`python -m tasks.trainer --data X.jsonl` (e.g. the output of `drift weights`) gives the same
    rows as the parquet artifact; a broken line names the file and line."""
    from tasks.trainer import read_training_data

    data = make_data(5, n_zero=1)
    data.write_parquet(tmp_path / "w.parquet")
    with (tmp_path / "w.jsonl").open("w") as f:
        for row in data.to_dicts():
            f.write(json.dumps(row) + "\n")
    assert read_training_data(tmp_path / "w.jsonl") == read_training_data(tmp_path / "w.parquet")
    (tmp_path / "bad.jsonl").write_text(json.dumps(data.row(0, named=True)) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
        read_training_data(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("weight", [None, float("nan"), -0.5])
def test_bad_weight_is_rejected_with_its_row(tiny_model_dir, weight):
    from tasks.models import load_tokenizer
    from tasks.trainer import prepare_examples

    rows = make_data(3).to_dicts()
    rows[1]["weight"] = weight
    with pytest.raises(
        ValueError, match=r"1 row\(s\) have a null, NaN or negative weight .*'prompt_id': 'p0'"
    ):
        prepare_examples(rows, load_tokenizer(str(tiny_model_dir)), cfg_for())


def test_train_cache_key_follows_results_not_placement():
    """train.batch_size changes the optimisation, so it is in the stage key; where and how the
    stage runs (processes, accelerate config, work pool, checkpoint interval) is not."""
    from tasks.caching import result_fields

    base = result_fields(cfg_for())
    assert result_fields(cfg_for(batch_size=8)) != base
    for placement in (
        {"num_processes": 8},
        {"accelerate_config": "configs/accelerate/fsdp.yaml"},
        {"work_pool": "drift-gpu"},
        {"checkpoint_every": 7},
        {"packing": True},  # the same objective with other kernels (tests/test_fast_paths.py)
        {"loss_kernel": "liger"},
        {"compile": True},
    ):
        assert result_fields(cfg_for(**placement)) == base, placement


def test_deepspeed_settings_come_from_the_train_config():
    """Under DeepSpeed there is no prepared DataLoader and drift accumulates by hand: the micro-batch
    size, accumulation 1 and clipping must be filled in before `prepare` (accelerate raises on
    'auto' micro-batch sizes without a DataLoader)."""
    from types import SimpleNamespace

    from tasks.trainer import _configure_deepspeed

    ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    accelerator = SimpleNamespace(
        num_processes=4, state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds_config))
    )
    _configure_deepspeed(accelerator, cfg_for(batch_size=16, grad_accum=3, max_grad_norm=0.5))
    assert ds_config == {
        "train_micro_batch_size_per_gpu": 4,  # the global micro-batch of 16 split over 4 ranks
        "gradient_accumulation_steps": 1,  # drift marks the step boundary itself
        "train_batch_size": 16,
        "gradient_clipping": 0.5,
    }
