"""The online multi-turn RL baseline (``drift online``): TRL's ``GRPOTrainer`` playing drift's protocol.

DRIFT's claim is that offline rollouts from a fixed reference plus weighted SFT match online
multi-turn RL at a fraction of its cost. This package is that online RL, run from the same config:
the same prompts (``data``), protocol (``drift_core.protocol``: prompt, pre-fill, stop string,
the configured feedback after a wrong answer, stop at the first correct answer, ``max_turns``),
verifier and grader (``tasks.grade``), sampling settings (``rollout.sampling``) and reward
(``drift_core.returns.trajectory_return`` with ``weights.gamma`` and ``weights.repetition_lambda``).
Only the learning differs: the current policy generates, GRPO updates it.

One module per job: ``sampling`` (one turn for many token-id contexts, with the sampled tokens'
log-probabilities), ``rollout_func`` (the protocol's turn loop as TRL's ``rollout_func``: the TRL
adapter), ``run`` (``train_online``: config, run directory, checkpoints, costs, MLflow).
``tasks.online_rl`` re-exports the public names.
"""
