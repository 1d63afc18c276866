"""Pydantic models at drift's boundaries: every config section and the trajectory record.

Every range here rejects a value the method has no meaning for (beta <= 0, gamma outside (0, 1],
K < 1, ...), so a bad config fails before any compute and names the offending key. Unknown keys
are rejected too (``extra="forbid"``): a typo such as ``beat: 0.1`` must not silently fall back
to a default.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from drift_core.callables import function_identity, load_function
from drift_core.presets import expand_preset


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------
# Messages and records
# --------------------------------------------------------------------------------------------


class Message(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str


class TurnResult(StrictModel):
    """One graded assistant turn."""

    response: str
    answer: str | None = Field(description="answer text parsed from <answer>...</answer>, or None")
    normalized_answer: str | None = None
    correct: bool
    valid: bool = Field(description="False when no answer could be parsed (format penalty applies)")
    format_penalty: float = 0.0
    n_tokens: int = Field(default=0, ge=0)


class TrajectoryRecord(StrictModel):
    """One multi-turn episode of one prompt, as stored in the trajectories parquet."""

    prompt_id: str
    traj_idx: int = Field(ge=0)
    messages: list[Message]
    turn_correct: list[bool]
    turn_valid: list[bool]
    answers: list[str | None]
    normalized_answers: list[str | None]
    format_penalty: float = Field(le=0.0)
    n_turns: int = Field(ge=1)
    solved: bool
    gen_tokens: list[int]
    gen_seconds: float = Field(ge=0.0)


# --------------------------------------------------------------------------------------------
# Config sections
# --------------------------------------------------------------------------------------------


class ArithConfig(StrictModel):
    """The seeded integer-arithmetic generator behind ``builtin:arith``."""

    n: int = Field(default=200, ge=1, le=1_000_000)
    digits: int = Field(default=2, ge=1, le=9, description="digits per operand")
    n_operands: int = Field(default=2, ge=2, le=6)
    ops: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+", "-"])
    seed: int = 0


class GuessConfig(StrictModel):
    """The seeded number-guessing game behind ``builtin:guess`` ("I am thinking of a whole number from
    1 to 64. Guess it."; the secret is the gold). The range's secrets are split once, by ``seed``, into
    a train half and a test half (tasks/ingest.py), so the two splits share no secret."""

    low: int = Field(default=1, ge=-1_000_000, le=1_000_000, description="smallest secret (inclusive)")
    high: int = Field(
        default=64,
        ge=-1_000_000,
        le=1_000_000,
        description="largest secret (inclusive); at least low + 1, so each split holds a secret",
    )
    n: int = Field(default=200, ge=1, le=1_000_000, description="games (problems) in the split")
    seed: int = Field(default=0, description="the train/test partition of the secrets and each game's secret")

    @model_validator(mode="after")
    def _range_holds_two_secrets(self) -> GuessConfig:
        if self.high <= self.low:
            raise ValueError(
                f"guess.high ({self.high}) must be above guess.low ({self.low}): the train and test "
                "splits each need a secret of their own"
            )
        return self


class DataConfig(StrictModel):
    """Where problems come from and how their columns map onto (question, gold)."""

    source: str = Field(
        default="builtin:arith",
        description="builtin:arith | builtin:guess | builtin:gsm8k | a local .jsonl/.json/.parquet/.csv | "
        "hf:<dataset id>",
    )
    split: str = "train"
    subset: str | list[str] | None = Field(
        default=None, description="HF dataset config name, or several (their rows concatenated)"
    )
    question_field: str = "question"
    answer_field: str = "answer"
    id_field: str | None = Field(default=None, description="column holding a stable prompt id")
    gold_style: Literal["auto", "plain", "gsm8k", "boxed", "metamath"] = "auto"
    filter_field: str | None = None
    filter_value: str | None = None
    offset: int = Field(default=0, ge=0)
    limit: int | None = Field(default=None, ge=1)
    shuffle_seed: int | None = None
    on_bad_rows: Literal["error", "skip"] = "error"
    arith: ArithConfig = Field(default_factory=ArithConfig)
    guess: GuessConfig = Field(
        default_factory=GuessConfig,
        description="builtin:guess: range (low, high), games (n) and seed; left out of dumps for other "
        "sources while at its defaults",
    )
    # Multiple choice (tasks/ingest.py renders the options under the question, gold = the letter):
    correct_field: str | None = Field(
        default=None, description="column holding the correct option's text (GPQA: 'Correct Answer')"
    )
    incorrect_fields: list[str] | None = Field(
        default=None, description="columns holding the wrong options (GPQA: 'Incorrect Answer 1'..'3')"
    )
    choices_field: str | None = Field(
        default=None, description="column holding the list of options; answer_field: an index or a letter"
    )
    shuffle_choices: bool = Field(
        default=True, description="shuffle options per problem (seeded by choice_seed and the prompt id)"
    )
    choice_seed: int = 0

    @field_validator("subset")
    @classmethod
    def _subsets_not_empty(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and not v:
            raise ValueError("an empty list of subsets; leave subset unset or name at least one")
        return v

    @model_validator(mode="after")
    def _one_choice_layout(self) -> DataConfig:
        if (self.correct_field is None) != (self.incorrect_fields is None):
            raise ValueError("correct_field and incorrect_fields are set together (options as columns)")
        if self.incorrect_fields is not None and not self.incorrect_fields:
            raise ValueError("incorrect_fields: name at least one column of wrong options")
        if self.correct_field is not None and self.choices_field is not None:
            raise ValueError(
                "set either correct_field + incorrect_fields (options as columns) or choices_field + "
                "answer_field (a list of options), not both"
            )
        return self

    @model_serializer(mode="wrap")
    def _guess_only_where_used(self, handler):
        """The ``guess`` section is in dumps (cache keys, run params) of ``builtin:guess`` data, or once
        set: configs and keys written before it existed stay as they were."""
        data = handler(self)
        if self.source != "builtin:guess" and isinstance(data, dict) and self.guess == GuessConfig():
            data.pop("guess", None)
        return data

    @property
    def multiple_choice(self) -> bool:
        """Options rendered under the question and an option letter as gold."""
        return self.correct_field is not None or self.choices_field is not None


class ModelConfig(StrictModel):
    """A model reference: local directory, hub id, a builtin (``builtin:smollm2-135m-instruct``,
    ``builtin:tiny-smollm2``) or an MLflow registered model (``models:/name@alias``)."""

    path: str = "builtin:smollm2-135m-instruct"
    revision: str | None = None
    registry_uri: str | None = Field(
        default=None,
        description="MLflow registry for models:/ paths; None: $MLFLOW_REGISTRY_URI, run.tracking_uri, "
        "$MLFLOW_TRACKING_URI",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False


ReferenceDataset = Literal[
    "metamathqa", "math500", "gsm8k", "hendrycks_math", "theoremqa", "gpqa", "mmlu", "mmlu-redux", "mmlu_pro"
]


class FeedbackConfig(StrictModel):
    """A feedback kind other than fixed text (``drift_core.feedback``): ``direction`` for numeric
    golds, or ``callable`` (``function: "module:function"``, called as ``(answer, gold, turn)``)."""

    kind: Literal["direction", "callable"]
    function: str | None = Field(
        default=None,
        description="callable kind: 'module:function' taking (answer, gold, turn), returning str",
    )
    fallback: str = Field(
        default="Incorrect. Please think again.",
        min_length=1,
        description="direction kind: the text when the answer is not one readable number",
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_identity(cls, raw: Any) -> Any:
        """A dump carries the function's source hash (``source_sha256``, for cache keys); it is
        recomputed, never read back."""
        if isinstance(raw, dict) and "source_sha256" in raw:
            raw = {k: v for k, v in raw.items() if k != "source_sha256"}
        return raw

    @model_validator(mode="after")
    def _function_matches_kind(self) -> FeedbackConfig:
        if self.kind == "callable":
            if not self.function:
                raise ValueError("kind callable needs function: 'module:function'")
            load_function(self.function)  # ValueError naming what is wrong
        elif self.function is not None:
            raise ValueError(f"function is set only with kind callable (kind is {self.kind!r})")
        return self

    @model_serializer(mode="wrap")
    def _with_identity(self, handler):
        """A callable's identity in dumps (hence cache keys): its name and a hash of its source."""
        data = handler(self)
        if self.kind == "callable" and self.function:
            data["source_sha256"] = function_identity(self.function)
        return data


class ProtocolConfig(StrictModel):
    """The multi-turn protocol. Defaults are the reference scripts' (github.com/2020-qqtcg/DRIFT,
    src/prompting.py; run scripts' values where they pass one): see drift_core/protocol.py."""

    prompt_mode: Literal["simple", "full"] = "simple"
    answer_format: Literal["answer", "think"] = "answer"
    max_turns: int = Field(default=3, ge=1, le=50)
    feedback: str | FeedbackConfig = Field(
        default="Incorrect. Please think again.",
        description="fixed text (the paper's unary feedback), {kind: direction} (numeric golds: "
        "'Incorrect. The answer is larger.'/'smaller.') or {kind: callable, function: 'module:function'}",
    )
    max_actions: int = Field(default=1, ge=1, description="max ||-separated answers read per turn")
    max_actions_per_traj: int = Field(
        default=5, ge=1, description="full mode: the 'You have N actions left' budget (reference: 5)"
    )
    instruction_max_tokens: int = Field(
        default=400,
        ge=1,
        description="full mode: 'Max response length: N words (tokens).' (run scripts: 400)",
    )
    format_penalty: float = Field(default=-0.1, le=0.0)
    system_prompt: str = "You're a helpful assistant. "
    task_instruction: str | None = Field(
        default=None, description="overrides the instruction text (default: the reference's math instruction)"
    )
    prefill: bool = Field(default=True, description="pre-fill the generation prompt with <answer>/<think>")
    answer_parse: Literal["reference", "last_block"] = Field(
        default="reference",
        description="reference: the first <answer>..</answer> block (think: <think>..</think> then it), "
        "special tokens removed, as prompting.py's parse_response; last_block: drift's earlier reading, "
        "the last closed block",
    )
    history: Literal["canonical", "raw"] = Field(
        default="canonical",
        description="what the conversation keeps of an answer: canonical = the reference's re-rendering "
        "of the parsed answer (<answer>18</answer>); raw = the generated text",
    )

    @field_validator("feedback")
    @classmethod
    def _feedback_text_not_empty(cls, v: str | FeedbackConfig) -> str | FeedbackConfig:
        if isinstance(v, str) and not v.strip():
            raise ValueError("empty feedback text; give the text, {kind: direction} or {kind: callable, ...}")
        return v

    @model_validator(mode="after")
    def _canonical_needs_reference_parse(self) -> ProtocolConfig:
        if self.history == "canonical" and self.answer_parse != "reference":
            raise ValueError(
                "history: canonical is the reference's re-rendering of its own parse; with "
                "answer_parse: last_block set history: raw"
            )
        return self


class VerifierConfig(StrictModel):
    kind: Literal["auto", "math", "numeric", "exact", "choice", "reference"] = Field(
        default="math",
        description="auto: choice for multiple-choice data, numeric when every gold is a plain number, "
        "math otherwise (decided from the problem table before any generation); reference: the "
        "reference scripts' normalised string compare for reference_dataset",
    )
    reference_dataset: ReferenceDataset = Field(
        default="metamathqa",
        description="kind reference: check as the reference eval does for this --dataset (its "
        "normaliser; TheoremQA: numeric check); metamathqa = the generation script's check",
    )
    read: Literal["whole", "last_number"] = Field(
        default="whole",
        description="how an answer block is read: 'whole' = its text is the answer; 'last_number' = the "
        "last number in it (an equation '48 + 69 = 117' answers 117; no number = no readable answer)",
    )
    timeout_s: float = Field(default=5.0, gt=0.0, le=600.0)
    tolerance: float = Field(default=1e-6, ge=0.0)
    workers: int = Field(default=2, ge=1, le=256, description="grading process-pool size")

    @model_serializer(mode="wrap")
    def _leave_out_default_reference_dataset(self, handler):
        """At its default the field is absent from dumps, so verifier cache keys written before it
        existed still match."""
        return _without_field_at(handler(self), "reference_dataset", "metamathqa")


def _without_field_at(data: Any, field: str, value: Any) -> Any:
    """A model's dump without ``field`` while it holds ``value``: a setting added later stays out
    of cache keys (and lineage) until someone sets it, so existing artifacts keep their keys."""
    if isinstance(data, dict) and field in data and data[field] == value:
        del data[field]
    return data


class SamplingConfig(StrictModel):
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    feedback_temperature: float | None = Field(
        default=None,
        ge=0.0,
        le=10.0,
        description="temperature of the turns after feedback (turn 2 on); None = temperature. A "
        "hotter retry puts more 'wrong, feedback, right' trajectories into the rollouts while turn 1 "
        "keeps the reference's own accuracy (docs/results.md, Evidence v2b)",
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=64, ge=1, le=32768)

    def temperature_at(self, turn: int) -> float:
        """The sampling temperature of protocol turn ``turn`` (1-based)."""
        if turn > 1 and self.feedback_temperature is not None:
            return self.feedback_temperature
        return self.temperature

    @model_serializer(mode="wrap")
    def _leave_out_unset_feedback_temperature(self, handler):
        """Unset, the field is absent from dumps, so rollout cache keys written before it existed
        still match (a cached rollout is not re-made because a default was added)."""
        return _without_field_at(handler(self), "feedback_temperature", None)


class EngineConfig(StrictModel):
    kind: Literal["transformers", "vllm"] = "transformers"
    batch_size: int = Field(default=32, ge=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.85, gt=0.0, le=1.0)
    enable_prefix_caching: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    decoding: Literal["standard", "static", "continuous"] = Field(
        default="standard",
        description="transformers engine: 'standard' generate (dynamic KV cache); 'static' KV cache, "
        "whose decoding step generate compiles (torch.compile) on a GPU; 'continuous' batching "
        "(generate_batch, paged attention) for greedy decoding, sampling falls back to 'standard'",
    )
    pad_multiple: int = Field(
        default=64, ge=1, description="static decoding: prompt widths rounded up, so compiled shapes repeat"
    )
    scheduling: Literal["trajectory", "turn"] = Field(
        default="trajectory",
        description="vLLM: 'trajectory' submits a trajectory's next turn as soon as its own turn is graded; "
        "'turn' waits for every trajectory's turn first (the transformers engine always does). In "
        "float32 (dtype auto on a CPU) the same tokens either way (per-request seeds); in bfloat16 "
        "(asked for, or dtype auto on a GPU) the same distribution, not the same tokens, so vLLM's "
        "scheduler is in rollout and evaluation keys (docs/reliability.md, 'Reproducible')",
    )
    enforce_eager: bool | None = Field(
        default=None,
        description="vLLM: skip torch.compile and CUDA graphs; None: eager on a CPU (compiling there costs "
        "minutes of start-up and gains nothing measured), compiled on a GPU",
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="vLLM: context length to plan the KV cache for; None: the model's"
    )
    cpu_kv_cache_gib: float = Field(
        default=2.0, gt=0.0, description="vLLM on a CPU: memory for the KV cache (VLLM_CPU_KVCACHE_SPACE)"
    )


class RolloutConfig(StrictModel):
    k: int = Field(default=8, ge=1, le=1024, description="trajectories per prompt")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    shard_size: int = Field(default=32, ge=1, description="prompts per cached shard")
    seed: int = 0


class WeightsConfig(StrictModel):
    mode: Literal["drift", "uniform", "success_only"] = "drift"
    gamma: float = Field(default=0.9, gt=0.0, le=1.0)
    beta: float = Field(default=0.1, gt=0.0)
    repetition_lambda: float = Field(default=0.5, ge=0.0)
    unsolved_groups: Literal["weight", "drop"] = Field(
        default="weight",
        description="weight: every prompt's group weighted by the mode (the paper); drop: groups in "
        "which no trajectory is solved get weight 0, an ablation of where DRIFT's weight goes on a "
        "reference that rarely solves (docs/results.md, Evidence v2)",
    )

    @model_serializer(mode="wrap")
    def _leave_out_default_unsolved_groups(self, handler):
        """At its default the field is absent from dumps, so weights cache keys and registered
        lineage written before it existed still match."""
        return _without_field_at(handler(self), "unsolved_groups", "weight")


class LoraConfig(StrictModel):
    enabled: bool = False
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class TrainConfig(StrictModel):
    target: Literal["terminal", "all_turns"] = "terminal"
    normalize: Literal["mean", "weight_sum"] = Field(
        default="mean", description="mean of loss_i*w_i, or sum(loss_i*w_i)/sum(w) over all ranks"
    )
    learning_rate: float = Field(default=1e-5, gt=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    warmup_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    epochs: float = Field(default=1.0, gt=0.0)
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_seq_len: int = Field(default=1024, ge=8)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    packing: bool = Field(
        default=False,
        description="padding-free micro-batches: sequences concatenated, position ids restarting per "
        "sequence (flash-attention varlen / block-diagonal attention through transformers)",
    )
    loss_kernel: Literal["torch", "liger"] = Field(
        default="torch",
        description="liger: Liger's fused linear cross-entropy (liger-kernel, CUDA only; no logits "
        "tensor at all); without CUDA or liger-kernel the trainer says so and uses torch",
    )
    compile: bool = Field(default=False, description="torch.compile each decoder layer (regional)")
    supervise_eot: bool | Literal["reference"] = Field(
        default=True,
        description="the end-of-turn token closing each supervised message: true (drift) supervises "
        "it, so the model learns to stop; false masks the tokenizer's eos token; 'reference' does "
        "what weight_sft.py does, masking every label equal to the pad token (eos if none), which "
        "masks the end of turn where pad and end of turn are one token (SmolLM2) and not where "
        "they differ (Qwen2.5)",
    )
    lr_schedule: Literal["linear", "constant"] = Field(
        default="linear",
        description="after the warmup: linear decay to 0 (drift) or constant (weight_sft.py's run "
        "script: constant_with_warmup)",
    )
    checkpoint_every: int = Field(default=50, ge=1, description="optimizer steps between checkpoints")
    seed: int = 0
    lora: LoraConfig = Field(default_factory=LoraConfig)
    work_pool: str | None = Field(
        default=None, description="if set, train runs as its own deployment on this work pool"
    )
    num_processes: int | None = Field(
        default=None, ge=1, description="training processes on the worker; default one per visible GPU"
    )
    accelerate_config: str | None = Field(
        default=None,
        description="accelerate config YAML (FSDP, DeepSpeed: configs/accelerate/); launched with "
        "`accelerate launch`. Unset: DDP through torchrun when there are several processes",
    )

    @model_serializer(mode="wrap")
    def _leave_out_default_supervise_eot(self, handler):
        """At its default the field is absent from dumps, so train cache keys written before it
        existed still match (drift always supervised the end of turn)."""
        data = _without_field_at(handler(self), "supervise_eot", True)
        return _without_field_at(data, "lr_schedule", "linear")


_ENTRY_NAME = r"^[A-Za-z0-9_-]+$"


class EvalEntry(StrictModel):
    """One benchmark of an evaluation suite: its data, its verifier and protocol overrides.

    ``preset: <name>`` (see ``drift_core.presets``) fills in a paper benchmark's data and verifier;
    keys given beside it override the preset's (``data`` merges key by key)."""

    name: str = Field(pattern=_ENTRY_NAME, description="metrics are logged as <name>.multi_at_t<T>, ...")
    data: DataConfig
    verifier: VerifierConfig | None = Field(
        default=None, description="keys set here override eval.verifier's (default: kind auto)"
    )
    answer_format: Literal["answer", "think"] | None = Field(default=None, description="overrides protocol's")
    task_instruction: str | None = Field(default=None, description="overrides the instruction text")
    max_new_tokens: int | None = Field(default=None, ge=1, description="overrides eval.max_new_tokens")

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "preset" in raw:
            return expand_preset(raw)
        return raw


class EvalConfig(StrictModel):
    """What the evaluation runs on: ``data`` (one benchmark) or ``suite`` (several, each named)."""

    data: DataConfig = Field(default_factory=lambda: DataConfig(split="test"))
    suite: list[EvalEntry] | None = Field(
        default=None, description="named benchmarks; replaces data (set one of the two)"
    )
    verifier: VerifierConfig | None = Field(
        default=None,
        description="keys set here override, for every benchmark, the top-level verifier's settings "
        "with kind auto (what evaluation uses by default)",
    )
    answer_format: Literal["answer", "think"] | None = Field(
        default=None, description="overrides protocol.answer_format for evaluation (paper: think)"
    )
    prompt_mode: Literal["simple", "full"] | None = Field(
        default=None,
        description="overrides protocol.prompt_mode for evaluation (the reference's eval script: "
        "simple, whatever mode the rollouts used)",
    )
    max_turns: int | None = Field(default=None, ge=1, description="defaults to protocol.max_turns")
    max_new_tokens: int | None = Field(default=None, ge=1)
    shard_size: int = Field(default=64, ge=1)
    evaluate_reference: bool = Field(default=True, description="also evaluate the reference model")

    @model_validator(mode="after")
    def _data_or_suite(self) -> EvalConfig:
        if self.suite is not None:
            if "data" in self.model_fields_set:
                raise ValueError("set eval.data (one benchmark) or eval.suite (several), not both")
            if not self.suite:
                raise ValueError("eval.suite is empty; name at least one benchmark or use eval.data")
            names = [e.name for e in self.suite]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"eval.suite: duplicate entry names {dup}; names must be unique")
        return self

    @model_serializer(mode="wrap")
    def _leave_out_unset_prompt_mode(self, handler):
        """Unset, the field is absent from dumps: a run's params and lineage stay as they were
        before it existed."""
        return _without_field_at(handler(self), "prompt_mode", None)

    def entries(self) -> list[tuple[str, EvalEntry]]:
        """The suite as (config key, entry) pairs; ``eval.data`` is a suite of one whose name is
        the source's stem (``math500.jsonl`` -> ``math500``, ``hf:HuggingFaceH4/MATH-500`` ->
        ``MATH-500``, ``builtin:arith`` -> ``arith``)."""
        if self.suite is not None:
            return [(f"eval.suite[{i}]", e) for i, e in enumerate(self.suite)]
        return [("eval", EvalEntry(name=source_name(self.data.source), data=self.data))]


def source_name(source: str) -> str:
    """A metric-safe short name for a data source: the file stem, the hub dataset name, the builtin."""
    import re

    text = source.split("@", 1)[0] if source.startswith("hf:") else source
    text = text.rsplit(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".gz", ".jsonl", ".ndjson", ".json", ".parquet", ".csv"):
        text = text.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "eval"


class OnlineConfig(StrictModel):
    """The online multi-turn RL baseline (``drift online``): TRL's GRPOTrainer playing drift's
    protocol with the current policy. Sampling settings come from ``rollout.sampling``, the reward
    from ``weights`` (gamma, repetition_lambda) and the protocol, so both methods see the same task."""

    num_generations: int = Field(default=8, ge=2, le=1024, description="trajectories per prompt (GRPO group)")
    prompts_per_step: int = Field(default=8, ge=1, description="prompts per optimizer step")
    micro_batch_size: int = Field(
        default=8,
        ge=1,
        description="completions per forward/backward; divides prompts_per_step*num_generations",
    )
    max_steps: int = Field(default=100, ge=1, description="optimizer steps")
    max_turns: int | None = Field(default=None, ge=1, description="defaults to protocol.max_turns")
    learning_rate: float = Field(default=1e-6, gt=0.0, le=1.0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0, description="share of max_steps")
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    beta: float = Field(default=0.0, ge=0.0, description="KL coefficient against the initial policy")
    epsilon: float = Field(default=0.2, gt=0.0, description="PPO-style ratio clip")
    num_iterations: int = Field(default=1, ge=1, description="optimizer passes per generated batch")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    gradient_checkpointing: bool = False
    save_steps: int = Field(default=10, ge=1, description="optimizer steps between checkpoints")
    seed: int = 0
    output_dir: str = Field(
        default=".drift/online", description="local dir; each config gets its own sub-directory"
    )

    @model_validator(mode="after")
    def _micro_batches_divide(self) -> OnlineConfig:
        total = self.prompts_per_step * self.num_generations
        if total % self.micro_batch_size:
            raise ValueError(
                f"online.micro_batch_size={self.micro_batch_size} must divide "
                f"online.prompts_per_step*online.num_generations={total}"
            )
        return self


# A registered model name MLflow accepts (no '/' or ':') and a ``models:/NAME@alias`` URI can carry (no '@', quotes or spaces).
REGISTERED_MODEL_NAME = r"^[^/:@'\"\s]+$"


class RunConfig(StrictModel):
    name: str = "drift"
    artifact_store: str = Field(default=".drift/artifacts", description="local dir or fsspec URL")
    tracking_uri: str = Field(default="sqlite:///.drift/mlflow.db")
    experiment: str = "drift"
    task_runner: Literal["threads", "dask"] = "threads"
    dask_address: str | None = None
    max_workers: int = Field(default=1, ge=1, description="shards run at once by the thread runner")
    register_model: bool = Field(
        default=True,
        description="log the trained model to MLflow and register it as a version of registered_model",
    )
    registered_model: str | None = Field(
        default=None,
        pattern=REGISTERED_MODEL_NAME,
        description="MLflow registered model name; default drift-<run.name>",
    )


class PromoteConfig(StrictModel):
    """The promotion gate after evaluation: alias ``challenger`` always moves to the new version;
    ``champion`` only when its multi@T beats the champion's (no champion: the reference's) on the
    same eval problems by ``min_delta`` with the paired bootstrap interval above 0."""

    enabled: bool = True
    min_delta: float = Field(default=0.0, ge=-1.0, le=1.0, description="required multi@T gain")
    n_boot: int = Field(default=2000, ge=100, le=100_000)
    alpha: float = Field(default=0.05, gt=0.0, lt=1.0, description="two-sided interval level")
    seed: int = 0


class IterateConfig(StrictModel):
    """Iterated DRIFT (``drift run --rounds R``, flow ``drift-iterate``): round r's trained model is
    the reference and the base model of round r+1."""

    rounds: int = Field(default=1, ge=1, description="rounds to run")
    max_rounds: int = Field(default=10, ge=1, description="guard: rounds may not exceed this")
    stop_on_no_promotion: bool = Field(
        default=True,
        description="stop when a round's model is not promoted; false: go on from the round's own "
        "model (alias challenger) whatever the gate said",
    )


class DriftConfig(StrictModel):
    """The whole pipeline in one validated object; a YAML file maps onto it one to one."""

    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    reference_model: ModelConfig = Field(default_factory=ModelConfig)
    base_model: ModelConfig | None = Field(default=None, description="model to train; defaults to reference")
    protocol: ProtocolConfig = Field(default_factory=ProtocolConfig)
    verifier: VerifierConfig = Field(default_factory=VerifierConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    online: OnlineConfig = Field(default_factory=OnlineConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    iterate: IterateConfig = Field(default_factory=IterateConfig)

    @property
    def registered_model(self) -> str:
        return self.run.registered_model or f"drift-{self.run.name}"

    @property
    def train_model(self) -> ModelConfig:
        return self.base_model or self.reference_model

    @property
    def eval_max_turns(self) -> int:
        return self.eval.max_turns or self.protocol.max_turns

    def eval_verifier(self, entry: EvalEntry) -> VerifierConfig:
        """A benchmark's verifier: the top-level verifier's settings with kind ``auto`` (resolved
        against the golds before any generation), then the keys ``eval.verifier`` sets, then the
        keys the entry's own ``verifier`` sets (``{kind: choice}`` keeps the top-level timeout)."""
        out = self.verifier.model_copy(update={"kind": "auto"})
        for layer in (self.eval.verifier, entry.verifier):
            if layer is not None:
                out = out.model_copy(update={k: getattr(layer, k) for k in layer.model_fields_set})
        return out

    @field_validator("base_model", mode="before")
    @classmethod
    def _empty_base_is_none(cls, v: Any) -> Any:
        return None if v in ({}, "") else v

    @model_validator(mode="after")
    def _vllm_needs_gpu(self) -> DriftConfig:
        if self.engine.kind == "vllm" and self.engine.device == "cpu":
            raise ValueError("engine.kind=vllm cannot run with engine.device=cpu")
        if self.iterate.rounds > self.iterate.max_rounds:
            raise ValueError(
                f"iterate.rounds={self.iterate.rounds} exceeds iterate.max_rounds={self.iterate.max_rounds}"
            )
        derived = self.run.register_model and self.run.registered_model is None
        if derived and not re.match(REGISTERED_MODEL_NAME, self.registered_model):
            raise ValueError(
                f"run.name={self.run.name!r} makes the registered model name {self.registered_model!r} "
                "(default drift-<run.name>), which MLflow or a models:/NAME@alias URI refuses (no '/', ':', '@', "
                "quotes or spaces): change run.name, set run.registered_model, or run.register_model: false"
            )
        if self.iterate.rounds > 1 and not self.run.register_model:
            raise ValueError(
                "iterate.rounds > 1 needs run.register_model: true (each round's model is the next "
                "round's reference through the MLflow registry)"
            )
        return self


def flatten(d: dict[str, Any] | BaseModel, prefix: str = "") -> dict[str, Any]:
    """Flatten nested config into dotted keys (``weights.beta``): the same keys for every run,
    so MLflow compares runs column by column."""
    if isinstance(d, BaseModel):
        d = d.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars) to a raw config dict. A
    part of the key that meets a list is an index into it: ``eval.suite.0.data.limit=5``."""
    import yaml  # local: keeps the import graph of drift_core light

    out = _deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value, e.g. weights.beta=0.2")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                where, n = ".".join(parts[:i]), len(node)
                size = f"{where!r} has {n} item{'' if n == 1 else 's'}" + (f" (0..{n - 1})" if n else "")
                if not part.isdigit():
                    raise ValueError(f"override {item!r}: {size}; {part!r} is not an index")
                index = int(part)
                if index >= n:
                    raise ValueError(f"override {item!r}: index {index} is out of range: {size}")
                if last:
                    node[index] = yaml.safe_load(value)
                else:
                    node = node[index]
                    if not isinstance(node, dict | list):
                        raise ValueError(f"override {item!r}: {'.'.join(parts[: i + 1])!r} is not a section")
                continue
            if last:
                node[part] = yaml.safe_load(value)
                break
            node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                raise ValueError(f"override {item!r}: {'.'.join(parts[: i + 1])!r} is not a section")
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d
