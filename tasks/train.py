"""Train stage as a Prefect task: weighted SFT of the base model, published as the ``train`` artifact.

The loop itself is :func:`tasks.trainer.train_weighted_sft`. This module decides where it runs:

* one process, no accelerate config: in this process (CPU, or the one GPU);
* several processes (``train.num_processes``; by default one per visible GPU): ``torchrun
  --standalone --nproc_per_node N -m tasks.trainer`` (DDP; a gloo group on the CPU);
* ``train.accelerate_config`` set (FSDP or DeepSpeed, ``configs/accelerate/*.yaml``): ``accelerate
  launch --config_file F --num_processes N -m tasks.trainer``, even for one process, so the file's
  sharding, offload and mixed-precision settings always apply.

The launched processes read the weighted parquet from the store and write the model into the
stage's staging directory; the task publishes it. Checkpoints live beside the store and are keyed
by the stage key, so a retry of a killed run resumes (see :mod:`tasks.trainer`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task

from drift_core.errors import MissingFileError
from drift_core.schemas import ModelConfig, TrainConfig
from tasks.caching import served_from_store
from tasks.models import resolve_model
from tasks.store import ArtifactStore, Manifest, StoreError

if TYPE_CHECKING:  # torch comes with the trainer: imported only when a model is trained here
    from tasks.trainer import TrainResult

log = logging.getLogger(__name__)

__all__ = ["checkpoint_dir_for", "launch_command", "resolve_num_processes", "train"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def checkpoint_dir_for(store: ArtifactStore, key: str) -> Path:
    """``<store root>/checkpoints/train/<key>``: stable across retries, so a rerun resumes. A remote
    store gets a local directory instead (accelerate writes checkpoints to a filesystem)."""
    root = Path(store.root) if store.is_local else Path(tempfile.gettempdir()) / "drift-checkpoints"
    return root / "checkpoints" / "train" / key


def resolve_num_processes(cfg: TrainConfig, requested: int | None = None) -> int:
    """Processes to train with: an explicit request, else ``cfg.num_processes``, else one per
    visible GPU (one on a CPU-only worker)."""
    if requested:
        return requested
    if cfg.num_processes:
        return cfg.num_processes
    import torch

    return max(1, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def accelerate_config_path(cfg: TrainConfig) -> Path | None:
    """The accelerate config file as an absolute path (the launcher runs in the repository root)."""
    if not cfg.accelerate_config:
        return None
    path = Path(cfg.accelerate_config).expanduser()
    if not path.is_absolute():  # relative to the working directory, else to the repository
        path = path.resolve() if path.exists() else REPO_ROOT / path
    if not path.is_file():
        raise MissingFileError(
            f"train.accelerate_config: {cfg.accelerate_config!r} is not a file (expected an accelerate "
            "config YAML such as configs/accelerate/fsdp.yaml)"
        )
    return path


def launch_command(cfg: TrainConfig, num_processes: int, trainer_args: list[str]) -> list[str] | None:
    """The command that runs ``tasks.trainer`` across processes, or None to train in this process."""
    config_file = accelerate_config_path(cfg)
    if config_file is not None:
        return [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "--num_processes", str(num_processes), "--num_machines", "1", "--module", "tasks.trainer",
            *trainer_args,
        ]  # fmt: skip
    if num_processes > 1:
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes),
            "-m", "tasks.trainer", *trainer_args,
        ]  # fmt: skip
    return None


def _run_launched(
    cfg: TrainConfig,
    num_processes: int,
    data_path: str,
    model_path: str,
    model_cfg: ModelConfig,
    output_dir: Path,
    checkpoint_dir: Path,
    logger: logging.Logger | logging.LoggerAdapter,
) -> TrainResult:
    """Run the trainer under its launcher, streaming its output into the task's log."""
    with tempfile.TemporaryDirectory(prefix="drift-train-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "train.json").write_text(cfg.model_dump_json())
        (tmp_path / "model.json").write_text(model_cfg.model_dump_json())
        result_file = tmp_path / "result.json"
        trainer_args = [
            "--data", data_path, "--model", model_path, "--model-config", str(tmp_path / "model.json"),
            "--config", str(tmp_path / "train.json"), "--output", str(output_dir),
            "--checkpoints", str(checkpoint_dir), "--result", str(result_file), "--no-progress",
        ]  # fmt: skip
        cmd = launch_command(cfg, num_processes, trainer_args)
        assert cmd is not None, "one process without an accelerate config trains in-process"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        logger.info("launching %s", " ".join(cmd))
        tail: deque[str] = deque(maxlen=60)
        # its own process group: on failure or cancellation the launcher and every rank it started
        # are stopped together (_stop_launched), none outlives the stage
        with subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            process_group=0,
        ) as proc:
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    tail.append(line)
                    logger.info(line.rstrip())
            except BaseException:
                _stop_launched(proc)
                raise
        if proc.returncode != 0 or not result_file.exists():
            raise RuntimeError(
                f"distributed training exited with code {proc.returncode}; last output:\n{''.join(tail)}"
            )
        from tasks.trainer import TrainResult

        return TrainResult.model_validate_json(result_file.read_text())


def _stop_launched(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a launcher and its ranks: SIGTERM to its process group (torchrun and accelerate pass
    it on to their workers, which torchrun starts in sessions of their own), then SIGKILL to any
    of them still alive after ``grace_s``."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    proc.wait()


def _logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:  # called as ``train.fn(...)`` outside a flow run
        return log


@task(name="train")
def train(
    weighted: Manifest,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    store_root: str,
    key: str,
    num_processes: int | None = None,
) -> Manifest:
    """Train the base model on the weighted trajectories; publish the model directory as the
    ``train`` artifact. In-process for one process, a launcher for several or for FSDP/DeepSpeed."""
    logger = _logger()
    store = ArtifactStore(store_root)
    if (hit := served_from_store(store, "train", key)) is not None:
        return hit
    processes = resolve_num_processes(cfg, num_processes)
    model_path = resolve_model(model_cfg)
    checkpoint_dir = checkpoint_dir_for(store, key)
    staging = store.staging_dir("train", key)
    launched = processes > 1 or accelerate_config_path(cfg) is not None
    try:
        if launched:
            if not store.verify(weighted):
                raise StoreError(f"weighted artifact {weighted.uri} is missing or corrupt")
            data_path = store.local_path(weighted)
            result = _run_launched(
                cfg, processes, data_path, model_path, model_cfg, staging, checkpoint_dir, logger
            )
        else:
            from tasks import trainer

            data = store.read_parquet(weighted)
            result = trainer.train_weighted_sft(
                data, model_path, model_cfg, cfg, staging, checkpoint_dir, progress=True
            )
        meta = {
            "final_loss": result.final_loss,
            "steps": result.steps,
            "tokens_per_s": result.tokens_per_s,
            "seconds": result.seconds,
            "loss_history": [list(h) for h in result.loss_history],
            "resumed_from_step": result.resumed_from_step,
            "processes": processes,
            "ranks": [list(r) for r in result.ranks],
            "launcher": "accelerate"
            if cfg.accelerate_config
            else ("torchrun" if processes > 1 else "in-process"),
            "accelerate_config": Path(cfg.accelerate_config).name if cfg.accelerate_config else None,
        }
        manifest = store.publish_dir(staging, stage="train", key=key, rows=result.examples, meta=meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the model is published: checkpoints are spent
    logger.info(
        "trained %d steps, final loss %s, %.0f tokens/s", result.steps, result.final_loss, result.tokens_per_s
    )
    return manifest
