"""Verifiers, gold extraction and answer normalisation on real answer pairs."""

from __future__ import annotations

import pickle
import signal
import threading
import time

import pytest

from drift_core.schemas import VerifierConfig
from drift_core.verify import (
    ChoiceVerifier,
    ExactVerifier,
    MathVerifier,
    NumericVerifier,
    Verdict,
    extract_gold,
    make_verifier,
    normalize_answer,
    parse_choice,
    parse_number,
    run_with_time_limit,
    unreadable_gold,
)

MATH = MathVerifier(timeout_s=5.0)

# (answer, gold): equivalent forms that must verify as correct.
EQUIVALENT = [
    ("1/2", "0.5", "slash-fraction-vs-decimal"),
    ("\\frac{1}{2}", "0.5", "frac-vs-decimal"),
    ("\\dfrac{1}{2}", "\\frac12", "dfrac-vs-frac"),
    ("2\\sqrt{2}", "\\sqrt{8}", "sqrt-simplified"),
    ("\\sqrt8", "2\\sqrt2", "sqrt-no-braces"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", "sqrt-over-2"),
    ("(1,2)", "(1, 2)", "tuple-spacing"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", "polar-tuple-left-right"),
    ("30^\\circ", "30", "degrees"),
    ("30°", "30", "degree-sign"),
    ("\\text{Monday}", "Monday", "text-wrapper"),
    ("\\text{(B)}", "B", "text-letter"),
    ("1,000", "1000", "thousands-comma"),
    ("1,000,000", "10^6", "million-vs-power"),
    ("50\\%", "50", "percent"),
    ("3.0", "3", "trailing-zero"),
    ("18.00", "18", "money-decimals"),
    ("\\$18", "18", "escaped-dollar"),
    ("$18", "18", "currency-dollar"),
    ("$\\frac12$", "0.5", "math-delimiters"),
    ("[1,2)", "[1, 2)", "half-open-interval"),
    ("(-\\infty, 3]", "(-\\infty,3]", "interval-infinity"),
    ("\\{1,2\\}", "\\{2,1\\}", "set-order"),
    ("-5", "-5", "negative-integer"),
    ("-\\frac{3}{4}", "-0.75", "negative-fraction"),
    ("x^2+2x+1", "(x+1)^2", "polynomial-expanded"),
    ("3+2i", "2i+3", "complex-order"),
    ("x=5", "5", "assignment"),
    ("5\\text{ cm}", "5", "units"),
    ("12.", "12", "trailing-period"),
    ("\\boxed{7}", "7", "already-boxed"),
    ("1/3", "0.333333", "float-rounding-6"),
]

# (answer, gold): near misses that must NOT verify.
NEAR_MISS = [
    ("0.33", "\\frac{1}{3}", "0.33-vs-third"),
    ("12", "21", "swapped-digits"),
    ("(1,2)", "(2,1)", "tuple-order"),
    ("\\sqrt{2}", "2", "sqrt2-vs-2"),
    ("1000", "100", "extra-zero"),
    ("-5", "5", "sign"),
    ("\\pi", "3.14159", "pi-vs-approx"),
    ("10", "10.0001", "close-but-not-equal"),
    ("\\text{Tuesday}", "\\text{Monday}", "other-text"),
    ("[1,2]", "(1,2)", "closed-vs-open-interval"),
    ("2, 3, 4", "2, 3", "extra-element"),
]


@pytest.mark.parametrize(("answer", "gold"), [p[:2] for p in EQUIVALENT], ids=[p[2] for p in EQUIVALENT])
def test_math_equivalent(answer: str, gold: str) -> None:
    assert MATH(answer, gold) == Verdict(correct=True, valid=True)


@pytest.mark.parametrize(("answer", "gold"), [p[:2] for p in NEAR_MISS], ids=[p[2] for p in NEAR_MISS])
def test_math_near_miss(answer: str, gold: str) -> None:
    assert MATH(answer, gold) == Verdict(correct=False, valid=True)


@pytest.mark.parametrize(
    "answer", ["", "   ", "???", "$$", "\\text{}"], ids=["empty", "blank", "marks", "dollars", "empty-text"]
)
def test_math_invalid(answer: str) -> None:
    assert MATH(answer, "5") == Verdict(correct=False, valid=False)


def test_math_unparseable_gold_compares_normal_forms() -> None:
    assert MATH("???", "???").correct
    assert MATH("5", "???") == Verdict(False, True)


def test_math_timeout_returns_quickly() -> None:
    verifier = MathVerifier(timeout_s=1.0)
    handler_before = signal.getsignal(signal.SIGALRM)
    outer_timer = signal.getitimer(signal.ITIMER_REAL)  # pytest-timeout's, when it runs with --timeout
    start = time.monotonic()
    verdict = verifier("9^{9^{9^{9}}}", "5")
    elapsed = time.monotonic() - start
    assert verdict == Verdict(correct=False, valid=True)
    # cut off at the 1 s limit (unlimited, the expression runs for minutes); the margin is for a
    # loaded machine: a 2 s bound failed when other jobs kept both cores busy
    assert elapsed < 6.0, elapsed
    # the handler is restored, and so is the timer: none left armed, or the outer one still running
    assert signal.getsignal(signal.SIGALRM) == handler_before
    if outer_timer == (0.0, 0.0):
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    else:
        assert 0.0 < signal.getitimer(signal.ITIMER_REAL)[0] <= outer_timer[0]


def test_time_limit_restores_outer_timer() -> None:
    fired: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert run_with_time_limit(0.5, lambda: Verdict(True, True)) == Verdict(True, True)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0
        assert run_with_time_limit(0.2, lambda: time.sleep(5) or Verdict(True, True)) == Verdict(False, True)
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 25.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not fired


def test_off_main_thread_runs_without_limit() -> None:
    results: list[Verdict] = []
    thread = threading.Thread(target=lambda: results.append(MATH("\\frac{1}{2}", "0.5")))
    thread.start()
    thread.join(30)
    assert results == [Verdict(True, True)]


def test_verifiers_pickle() -> None:
    for verifier in (MATH, NumericVerifier(tolerance=0.01), ExactVerifier(), ChoiceVerifier()):
        clone = pickle.loads(pickle.dumps(verifier))
        assert clone == verifier


def test_make_verifier() -> None:
    assert make_verifier(VerifierConfig(kind="math", timeout_s=2)) == MathVerifier(timeout_s=2)
    assert make_verifier(VerifierConfig(kind="numeric", tolerance=0.1)) == NumericVerifier(
        timeout_s=5.0, tolerance=0.1
    )
    assert isinstance(make_verifier(VerifierConfig(kind="exact")), ExactVerifier)
    assert isinstance(make_verifier(VerifierConfig(kind="choice")), ChoiceVerifier)


# ------------------------------------------------------------------ numeric


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42.0),
        ("-3.5", -3.5),
        ("1,000", 1000.0),
        ("3/4", 0.75),
        ("\\frac{3}{4}", 0.75),
        ("-\\dfrac{3}{4}", -0.75),
        ("$18.00", 18.0),
        ("18 dollars", 18.0),
        ("50%", 50.0),
        ("1e-3", 0.001),
        ("\\text{12}.", 12.0),
        ("5 or 6", None),
        ("x=5", None),
        ("1,2", None),
        ("3/0", None),
        ("", None),
    ],
)
def test_parse_number(text: str, value: float | None) -> None:
    assert parse_number(text) == value


def test_numeric_tolerance() -> None:
    v = NumericVerifier(tolerance=1e-2)
    assert v("3.14", "3.1416") == Verdict(True, True)  # relative 5e-4
    assert v("3.2", "3.1416") == Verdict(False, True)
    assert v("0.005", "0") == Verdict(True, True)  # absolute
    assert v("3/4", "0.75") == Verdict(True, True)
    assert v("seven", "7") == Verdict(False, False)
    strict = NumericVerifier(tolerance=0.0)
    assert strict("0.75", "3/4").correct
    assert not strict("0.7500001", "3/4").correct
    with pytest.raises(ValueError, match="not a number"):
        v("1", "many")


# ------------------------------------------------------------------ exact


def test_exact() -> None:
    v = ExactVerifier()
    assert v("  Paris. ", "paris") == Verdict(True, True)
    assert v("\\text{New York}", "new york") == Verdict(True, True)
    assert v("$x+1$", "x + 1") == Verdict(True, True)
    assert v("1/2", "0.5") == Verdict(False, True)
    assert v("  ", "x") == Verdict(False, False)


# ------------------------------------------------------------------ choice


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B)", "B"),
        ("B.", "B"),
        ("The answer is B", "B"),
        ("The answer is (C).", "C"),
        ("Answer: J", "J"),
        ("(D) 42 apples", "D"),
        ("\\boxed{E}", "E"),
        ("K", None),
        ("I think it is the second one", None),
        ("42", None),
    ],
)
def test_parse_choice(text: str, letter: str | None) -> None:
    assert parse_choice(text) == letter


def test_choice_verifier() -> None:
    v = ChoiceVerifier()
    assert v("(B)", "B") == Verdict(True, True)
    assert v("The answer is B", "(B)") == Verdict(True, True)
    assert v("C", "B") == Verdict(False, True)
    assert v("no idea", "B") == Verdict(False, False)


# ------------------------------------------------------------------ gold extraction

# The first three rows of GSM8K test, copied verbatim.
GSM8K_ROWS = [
    (
        "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every "
        "day at the farmer\u2019s market.\n#### 18",
        "18",
    ),
    (
        "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 "
        "bolts of fabric\n#### 3",
        "3",
    ),
    (
        "The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\n"
        "He increased the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000\nSo the new value "
        "of the house is 120,000+80,000=$<<120000+80000=200000>>200,000\nSo he made a profit of "
        "200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000",
        "70000",
    ),
]


@pytest.mark.parametrize(("raw", "gold"), GSM8K_ROWS, ids=["janet", "robe", "house"])
@pytest.mark.parametrize("style", ["gsm8k", "auto"])
def test_extract_gold_gsm8k(raw: str, gold: str, style: str) -> None:
    assert extract_gold(raw, style) == gold


def test_extract_gold_gsm8k_removes_commas() -> None:
    assert extract_gold("So the total is 1,234,567.\n#### 1,234,567", "gsm8k") == "1234567"


MATH_SOLUTION = (
    "The cosine is $\\frac{1}{2}$, so the candidate is $\\boxed{\\frac{1}{2}}$ at first. "
    "Squaring gives $\\left(\\frac{\\sqrt{3}}{2}\\right)^2$, hence the answer is "
    "$\\boxed{\\frac{\\sqrt{3}}{2}}$."
)


@pytest.mark.parametrize("style", ["boxed", "auto"])
def test_extract_gold_boxed_nested_last(style: str) -> None:
    assert extract_gold(MATH_SOLUTION, style) == "\\frac{\\sqrt{3}}{2}"


def test_extract_gold_boxed_variants() -> None:
    assert extract_gold("so $\\boxed{\\{1, 2\\}}$", "boxed") == "\\{1, 2\\}"
    assert extract_gold("so $\\fbox{\\text{(C)}}$.", "boxed") == "\\text{(C)}"
    assert extract_gold("The answer is $\\boxed 5$.", "boxed") == "5"
    assert extract_gold("$\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}$", "boxed") == (
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"
    )
    with pytest.raises(ValueError, match="unbalanced"):
        extract_gold("$\\boxed{\\frac{1}{2}$", "boxed")


def test_extract_gold_metamath() -> None:
    raw = "Tim has 3 bags of 4 apples, so he has 3 * 4 = 12 apples.\nThe answer is: 12"
    assert extract_gold(raw, "metamath") == "12"
    assert extract_gold(raw, "auto") == "12"
    assert extract_gold("... The answer is: \\frac{1}{2}", "metamath") == "\\frac{1}{2}"


def test_extract_gold_plain() -> None:
    assert extract_gold("  \\frac{1}{2} \n", "plain") == "\\frac{1}{2}"
    assert extract_gold("42", "auto") == "42"


@pytest.mark.parametrize(
    ("raw", "style", "message"),
    [
        ("The total is 18.", "gsm8k", "####"),
        ("The total is 18.", "boxed", "boxed"),
        ("The total is 18.", "metamath", "The answer is:"),
        ("So the total is\n####   ", "gsm8k", "empty"),
        ("   ", "plain", "empty"),
    ],
)
def test_extract_gold_errors(raw: str, style: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        extract_gold(raw, style)


# ------------------------------------------------------------------ normalisation


@pytest.mark.parametrize(
    ("text", "norm"),
    [
        (" 5.0 ", "5"),
        ("2.50", "2.5"),
        ("-0.0", "0"),
        ("1,000", "1000"),
        ("1,2", "1,2"),
        ("$\\dfrac{1}{2}$", "\\frac{1}{2}"),
        ("\\text{Monday}.", "monday"),
        ("30^\\circ", "30"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("\\$1,234.50", "1234.5"),
        ("x + 1", "x+1"),
    ],
)
def test_normalize_answer(text: str, norm: str) -> None:
    assert normalize_answer(text) == norm


def _timed_call(verifier: MathVerifier) -> tuple[Verdict, float]:
    start = time.monotonic()
    verdict = verifier("9^{9^{9^{9}}}", "5")
    return verdict, time.monotonic() - start


def test_time_limit_applies_in_process_pool_worker() -> None:
    """Pool workers run tasks in their main thread, so the signal-based limit works there."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1) as pool:
        verdict, elapsed = pool.submit(_timed_call, MathVerifier(timeout_s=0.5)).result(timeout=30)
    assert verdict == Verdict(False, True)
    assert elapsed < 5.0, elapsed  # the 0.5 s limit, with a loaded machine's margin (see above)


# --------------------------------------------------------------------------------------------
# verifier.read = last_number: a small model's worked answer ("48 + 69 = 117") read as its result
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("48 + 69 = 117", "117"),
        ("117", "117"),
        ("-3 - 4 = -7.", "-7"),
        ("1,234 + 1 = 1,235", "1235"),
        ("2.5 * 2 = 5.0", "5.0"),
        ("I do not know", None),
        ("", None),
    ],
)
def test_last_number(text: str, expected: str | None) -> None:
    from drift_core.verify import last_number

    assert last_number(text) == expected


def test_last_number_reading_grades_the_result_not_the_equation() -> None:
    from drift_core.protocol import grade_turn
    from drift_core.schemas import ProtocolConfig

    whole = make_verifier(VerifierConfig(kind="numeric"))
    last = make_verifier(VerifierConfig(kind="numeric", read="last_number"))
    assert whole("48 + 69 = 117", "117") == (False, False)  # not a number as a whole
    assert last("48 + 69 = 117", "117") == (True, True)
    assert last("48 + 69 = 127", "117") == (False, True)
    assert last("no digits here", "117") == (False, False)
    assert last("117", "117") == (True, True)
    cfg = ProtocolConfig(format_penalty=-0.1)
    turn = grade_turn("<answer>48 + 69 = 117</answer>", "117", cfg, last)
    # the answer stays as written; its normal form is the number read, so "117" later is a repeat
    assert (turn.answer, turn.normalized_answer, turn.correct, turn.valid) == (
        "48 + 69 = 117",
        "117",
        True,
        True,
    )
    assert turn.format_penalty == 0.0
    unreadable = grade_turn("<answer>no idea</answer>", "117", cfg, last)
    assert (unreadable.correct, unreadable.valid, unreadable.format_penalty) == (False, True, 0.0)
    assert pickle.loads(pickle.dumps(last)) == last


# -- the reference scripts' check (issue 30, item 2): hand values from benchmark.py's rules ----


@pytest.mark.parametrize(
    ("dataset", "answer", "gold", "verdict", "form"),
    [
        ("metamathqa", "18", "18", (True, True), "18"),
        ("metamathqa", "$18", "18", (False, True), "$18"),
        ("metamathqa", "18.", "18", (False, True), "18."),
        ("metamathqa", "\\text{18}", "18", (False, True), "\\text{18}"),
        ("math500", "\\frac{1}{2}", "\\frac{1}{2}", (True, True), "\\frac{1}{2}"),
        ("math500", "0.5", "\\frac{1}{2}", (False, True), "0.5"),
        ("gsm8k", " X + 1 ", "x+1", (True, True), "x+1"),
        ("hendrycks_math", "\\pi", "\\Pi", (True, True), "\\pi"),
        ("mmlu", "The answer is (B)", "B", (True, True), "b"),
        ("mmlu", "a", "A", (True, True), "a"),
        ("gpqa", "B or C", "B", (False, True), "c"),
        ("mmlu_pro", "J", "J", (True, True), "j"),
        ("mmlu-redux", "none", "A", (False, True), "none"),
        ("theoremqa", "-5", "5", (True, True), "5"),
        ("theoremqa", "2.50 m", "2.5", (True, True), "2.5"),
        ("theoremqa", "3.0", "3", (True, True), "3"),
        ("theoremqa", "True", "true", (True, False), "true"),
        ("theoremqa", "(a)", "a", (True, False), "a"),
        ("theoremqa", "no", "yes", (False, False), "no"),
    ],
)
def test_reference_verifier(
    dataset: str, answer: str, gold: str, verdict: tuple[bool, bool], form: str
) -> None:
    v = make_verifier(VerifierConfig(kind="reference", reference_dataset=dataset))
    assert tuple(v(answer, gold)) == verdict
    assert v.normal_form(answer) == form


def test_reference_verifier_setting_stays_out_of_dumps_at_its_default() -> None:
    """Verifier cache keys of the other kinds are unchanged by the new setting."""
    assert "reference_dataset" not in VerifierConfig(kind="math").model_dump()
    assert (
        VerifierConfig(kind="reference", reference_dataset="gpqa").model_dump()["reference_dataset"] == "gpqa"
    )
    assert unreadable_gold("reference", "anything") is None
    assert unreadable_gold("reference", " ") == "empty"
