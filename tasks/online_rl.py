"""The public entry of the online RL baseline (``drift online``): see ``tasks.online``.

Kept so ``flows/cli.py``, the benchmarks and the tests import one stable name; the code lives in
``tasks.online.sampling`` (token-level sampling), ``tasks.online.rollout_func`` (the TRL adapter)
and ``tasks.online.run`` (the run).
"""

from tasks.online.rollout_func import (
    TRL_VERSION_TESTED,
    Problem,
    ProtocolRollout,
    drift_return,
    problem_index,
    prompt_key,
)
from tasks.online.run import (
    COSTS_FILE,
    MODEL_DIR,
    RESULT_FILE,
    ROLLOUTS_DIR,
    OnlineResult,
    check_sampling,
    grpo_config,
    last_complete_checkpoint,
    run_dir,
    train_online,
)
from tasks.online.sampling import kept_length, sample_turn

__all__ = [
    "COSTS_FILE",
    "MODEL_DIR",
    "RESULT_FILE",
    "ROLLOUTS_DIR",
    "TRL_VERSION_TESTED",
    "OnlineResult",
    "Problem",
    "ProtocolRollout",
    "check_sampling",
    "drift_return",
    "grpo_config",
    "kept_length",
    "last_complete_checkpoint",
    "problem_index",
    "prompt_key",
    "run_dir",
    "sample_turn",
    "train_online",
]
