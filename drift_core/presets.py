"""Eval-suite presets for the paper's six benchmarks (docs/method.md#metrics): hub ids, splits,
columns, verifiers. A suite entry ``{preset: math500}`` expands to the dict below (name defaults to the
preset's); keys given beside ``preset`` override it, ``data`` key by key::

    eval:
      suite:
        - preset: math500
        - {preset: gpqa-diamond, data: {limit: 50}}

They need hub access and ``pip install drift[hf]`` (GPQA is gated: accept its terms on the hub and
log in). The tests check each preset's column layout on small local files of the same shape.
Choices made here, not by the paper: MMLU-Redux keeps the rows its annotators marked ``ok`` (the
others have a wrong or ambiguous gold); TheoremQA keeps its image questions (the image is not
shown); MATH is the 5,000-problem test set of the seven subjects.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CHOICE_INSTRUCTION_A_TO_J", "EVAL_PRESETS", "MMLU_SUBJECTS", "expand_preset"]

# The MMLU-Pro preset's instruction, quoted from the reference (src/benchmark.py) byte for byte (the
# A-D one is drift_core.protocol's CHOICE_INSTRUCTION). Here, not in protocol, so that this module (which
# drift_core.schemas expands suite entries with) imports nothing of drift's.
CHOICE_INSTRUCTION_A_TO_J = (
    "You are solving multiple-choice questions. Only give the final answer letter (A-J) "
    "between <answer> and </answer>."
)

#: The 57 MMLU subjects, each a config of ``edinburgh-dawg/mmlu-redux-2.0``.
MMLU_SUBJECTS = [
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management",
    "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology",
    "us_foreign_policy", "virology", "world_religions",
]  # fmt: skip

MATH_SUBJECTS = [
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
    "prealgebra", "precalculus",
]  # fmt: skip

EVAL_PRESETS: dict[str, dict[str, Any]] = {
    # 500 problems; `answer` holds the final answer in LaTeX (e.g. \left( 3, \frac{\pi}{2} \right)).
    "math500": {
        "data": {
            "source": "hf:HuggingFaceH4/MATH-500",
            "split": "test",
            "question_field": "problem",
            "answer_field": "answer",
            "gold_style": "plain",
            "id_field": "unique_id",
        },
        "verifier": {"kind": "math"},
    },
    # 800 problems; answers are numbers, lists, True/False or an option such as (a).
    "theoremqa": {
        "data": {
            "source": "hf:TIGER-Lab/TheoremQA",
            "split": "test",
            "question_field": "Question",
            "answer_field": "Answer",
            "gold_style": "plain",
        },
        "verifier": {"kind": "math"},
    },
    # 198 questions, options as columns; gated on the hub.
    "gpqa-diamond": {
        "data": {
            "source": "hf:Idavidrein/gpqa",
            "subset": "gpqa_diamond",
            "split": "train",
            "question_field": "Question",
            "correct_field": "Correct Answer",
            "incorrect_fields": ["Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"],
            "id_field": "Record ID",
        },
        "verifier": {"kind": "choice"},
    },
    # 57 subjects x 100 questions; `choices` a list, `answer` the index of the correct one.
    "mmlu-redux": {
        "data": {
            "source": "hf:edinburgh-dawg/mmlu-redux-2.0",
            "subset": MMLU_SUBJECTS,
            "split": "test",
            "question_field": "question",
            "choices_field": "choices",
            "answer_field": "answer",
            "filter_field": "error_type",
            "filter_value": "ok",
        },
        "verifier": {"kind": "choice"},
    },
    # 5,000 problems over seven subject configs; the gold is the last \boxed{} of `solution`.
    "math": {
        "data": {
            "source": "hf:EleutherAI/hendrycks_math",
            "subset": MATH_SUBJECTS,
            "split": "test",
            "question_field": "problem",
            "answer_field": "solution",
            "gold_style": "boxed",
        },
        "verifier": {"kind": "math"},
    },
    # 12,032 questions with up to 10 options (A-J); `answer` is the letter.
    "mmlu-pro": {
        "data": {
            "source": "hf:TIGER-Lab/MMLU-Pro",
            "split": "test",
            "question_field": "question",
            "choices_field": "options",
            "answer_field": "answer",
            "id_field": "question_id",
        },
        "verifier": {"kind": "choice"},
        # the reference's instruction for up to ten options (benchmark.py: MMLU_PRO_INSTRUCTION)
        "task_instruction": CHOICE_INSTRUCTION_A_TO_J,
    },
}


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def expand_preset(raw: dict[str, Any]) -> dict[str, Any]:
    """``{preset: NAME, ...overrides}`` -> a full suite entry dict (name defaults to NAME)."""
    rest = {k: v for k, v in raw.items() if k != "preset"}
    name = raw["preset"]
    if name not in EVAL_PRESETS:
        raise ValueError(f"unknown eval preset {name!r}; known: {', '.join(EVAL_PRESETS)}")
    return _merge({"name": name, **EVAL_PRESETS[name]}, rest)
