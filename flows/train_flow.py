"""The train stage as a deployment of its own, so it can run on other workers (GPUs).

``train.work_pool: drift-gpu`` in a config makes the ``drift`` flow run ``train_on_pool`` instead of
``train``: it starts the deployment ``drift-train/<pool>`` (``drift-train/drift-gpu`` in
prefect.yaml), waits for it, and reads the model the GPU run published in the artifact store.

The artifact store is the hand-over, not Prefect results: both sides already agree on it, the
model directory is large, and the stage stays cached by the same key whichever worker trained it.
So the store must be reachable from both pools (``run.artifact_store`` an ``s3://``/``gs://`` URL,
or a shared filesystem mounted at the same path).
"""

from __future__ import annotations

from prefect import flow, task

from drift_core.schemas import ModelConfig, TrainConfig
from tasks.caching import served_from_store
from tasks.store import ArtifactStore, Manifest
from tasks.train import train

# How often the waiting flow asks the API whether the training run finished.
POLL_SECONDS = 2.0


@flow(name="drift-train", log_prints=True, persist_result=False)
def train_flow(
    weighted: Manifest,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    store_root: str,
    key: str,
    num_processes: int | None = None,
) -> dict:
    """Weighted SFT on the worker that picks this run up. ``num_processes`` defaults to
    ``train.num_processes``, else one process per visible GPU (one on a CPU worker)."""
    state = train(
        weighted=weighted,
        model_cfg=model_cfg,
        cfg=cfg,
        store_root=store_root,
        key=key,
        num_processes=num_processes,
        return_state=True,
    )
    return state.result().model_dump(mode="json")


@task(name="train", task_run_name="train-on-{work_pool}")
def train_on_pool(
    weighted: Manifest,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    store_root: str,
    key: str,
    work_pool: str,
) -> Manifest:
    """Run the train stage as the deployment ``drift-train/<work_pool>`` and return its artifact."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    store = ArtifactStore(store_root)
    if (hit := served_from_store(store, "train", key)) is not None:
        return hit
    deployment = f"drift-train/{work_pool}"
    parameters = {
        "weighted": weighted.model_dump(mode="json"),
        "model_cfg": model_cfg.model_dump(mode="json"),
        "cfg": cfg.model_dump(mode="json"),
        "store_root": store_root,
        "key": key,
    }
    try:  # waits until a worker on the pool has run it: start one (docs/operations.md)
        run = run_deployment(deployment, parameters=parameters, poll_interval=POLL_SECONDS)
    except ObjectNotFound as exc:
        raise RuntimeError(
            f"train.work_pool={work_pool!r} needs the deployment {deployment}: "
            f"`prefect deploy --name {deployment}` (prefect.yaml declares drift-train/drift-gpu), and "
            "PREFECT_API_URL must point at the server it is deployed on"
        ) from exc
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        message = run.state.message if run.state else ""
        raise RuntimeError(f"train deployment {deployment} (flow run {run.id}) ended {state}: {message}")
    found = store.find("train", key)
    if found is None:
        raise RuntimeError(
            f"train deployment {deployment} completed but its model is not in the artifact store "
            f"{store_root!r} as seen from here: run.artifact_store must be shared by both work pools"
        )
    return found
