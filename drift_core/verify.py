"""Answer verifiers, gold extraction and answer normalisation.

A verifier decides whether one parsed answer matches the gold answer:
``verifier(answer, gold) -> Verdict(correct, valid)``. ``valid`` is False when the answer cannot be
read as the verifier's kind at all (no number for ``numeric``, no letter for ``choice``, nothing
math-verify can extract for ``math``). Verifiers are small frozen dataclasses, so they pickle and can
be sent to the grading process pool.

Time limit
----------
Every verifier call runs under ``timeout_s``. In the main thread of a process (which is where a
``ProcessPoolExecutor`` worker runs its tasks) the limit is a ``SIGALRM`` timer (``setitimer``, so
fractions of a second work) around the whole call: answer parsing, gold parsing and comparison
together. A call that hits the limit returns ``Verdict(correct=False, valid=True)``: we could not
decide, so the answer earns no reward, but it is not a format error.

Signals only work in the main thread. Called from any other thread the verifier runs *without* a
limit, and the caller must enforce one; the grading pool does, by waiting on each future with a
timeout. The same holds for work that does not return to the interpreter (a long C-level
computation cannot be interrupted by a Python signal handler): only the pool can stop that.

math-verify has its own signal-based timeouts (``parse(parsing_timeout=...)``,
``verify(timeout_seconds=...)``). They accept whole seconds only (``signal.alarm``), each call gets its
own budget (a call could take 3x the limit), they raise ``ValueError`` off the main thread, and they
cancel any outer alarm. We therefore always pass ``None`` to them and use the single timer above.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Literal, NamedTuple

from drift_core.schemas import VerifierConfig

GoldStyle = Literal["auto", "plain", "gsm8k", "boxed", "metamath"]


class Verdict(NamedTuple):
    correct: bool
    valid: bool


TIMED_OUT = Verdict(correct=False, valid=True)


# --------------------------------------------------------------------------------------------
# Time limit
# --------------------------------------------------------------------------------------------


class _Timeout(BaseException):
    """Raised by our SIGALRM handler. A BaseException, so that ``except Exception`` blocks inside
    math-verify and sympy do not swallow it."""


def _can_use_signals() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _raise_timeout(signum: int, frame: object) -> None:
    raise _Timeout


def run_with_time_limit(seconds: float | None, fn: Callable[[], Verdict]) -> Verdict:
    """Run ``fn()``; return ``TIMED_OUT`` if it takes longer than ``seconds``.

    Enforced only in the main thread (see the module docstring); elsewhere ``fn`` runs unlimited.
    An outer ``ITIMER_REAL`` timer (e.g. pytest-timeout) is suspended and re-armed afterwards.
    """
    if not seconds or not _can_use_signals():
        return fn()
    old_handler = signal.signal(signal.SIGALRM, _raise_timeout)
    started = time.monotonic()
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    if old_delay > 0 and old_delay < seconds:
        signal.setitimer(signal.ITIMER_REAL, old_delay)
    try:
        try:
            return fn()
        finally:
            # The timer is one-shot: once this line has run, or once it has fired (and raised),
            # no further _Timeout can arrive, so the except/finally below run undisturbed.
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Timeout:
        return TIMED_OUT
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            remaining = max(old_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![a-zA-Z])")
_LATEX_SPACES = re.compile(r"\\[,;:! ]")


def _unwrap_text(s: str) -> str:
    while True:
        new = _TEXT_WRAPPER.sub(r"\1", s)
        if new == s:
            return s
        s = new


def _strip_trailing_period(s: str) -> str:
    return s[:-1] if s.endswith(".") and not s.endswith("..") else s


def _exact_form(text: str) -> str:
    """The normal form of ExactVerifier: strip, unwrap ``\\text{}``, drop ``$``, whitespace and a
    trailing period, lowercase."""
    s = _unwrap_text(text.strip())
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\s+", "", s).lower()
    return _strip_trailing_period(s)


def _canonical_number(s: str) -> str:
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _PLAIN_NUMBER.fullmatch(s):
        try:
            d = Decimal(s)
        except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
            return s
        if d == d.to_integral_value():
            return str(int(d))
        return format(d.normalize(), "f")
    return s


def normalize_answer(text: str) -> str:
    """Canonical form of an answer, used to spot repeated answers (the repetition penalty).

    Strips whitespace, ``$``, ``\\text{}``-style wrappers, ``\\left``/``\\right``, degree marks and a
    trailing period; lowercases; ``\\dfrac``/``\\tfrac`` -> ``\\frac``; a plain number loses its
    thousands commas and trailing zeros (``1,000`` -> ``1000``, ``5.0`` -> ``5``, ``2.50`` -> ``2.5``).
    This is a cheap textual form, not equivalence: ``1/2`` and ``0.5`` stay different.
    """
    s = _unwrap_text(text.strip())
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "%")
    s = _LEFT_RIGHT.sub("", s)
    s = _DEGREES.sub("", s)
    s = _LATEX_SPACES.sub("", s)
    s = re.sub(r"\s+", "", s).lower()
    s = _strip_trailing_period(s)
    return _canonical_number(s)


# --------------------------------------------------------------------------------------------
# Verifiers
# --------------------------------------------------------------------------------------------


_LAST_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number written in ``text`` ("48 + 69 = 117" -> "117", "1,234" -> "1234"), or None."""
    found = _LAST_NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", text))
    return found[-1] if found else None


@dataclass(frozen=True)
class Verifier:
    """Base class: ``__call__`` reads the answer (``read``) and applies the time limit around ``check``.

    ``read="last_number"`` lets a small model show its work inside the answer block ("48 + 69 = 117"):
    the answer is the last number written, and an answer block with no number is an invalid answer.
    """

    timeout_s: float = 5.0
    read: str = "whole"

    def read_answer(self, answer: str) -> str | None:
        """The answer as the verifier compares it, or None when nothing in it can be read."""
        if self.read == "last_number":
            return last_number(answer)
        return answer

    def normal_form(self, answer: str) -> str:
        """The answer's normal form for spotting repeated answers (the repetition penalty)."""
        return normalize_answer(self.read_answer(answer) or answer)

    def __call__(self, answer: str, gold: str) -> Verdict:
        text = self.read_answer(answer)
        if text is None:
            return Verdict(False, False)
        return run_with_time_limit(self.timeout_s, lambda: self.check(text, gold))

    def check(self, answer: str, gold: str) -> Verdict:
        raise NotImplementedError


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its own timeout is off; we pass None on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


_MATH_VERIFY_READY = False


def _math_verify():
    """Import math_verify lazily: it pulls in sympy and antlr, which ``import drift_core`` should not."""
    global _MATH_VERIFY_READY
    import math_verify

    if not _MATH_VERIFY_READY:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
        _MATH_VERIFY_READY = True
    return math_verify


_DELIMITED = re.compile(r"\$\$(.*)\$\$|\$(.*)\$|\\\((.*)\\\)|\\\[(.*)\\\]", re.DOTALL)


def _as_boxed_latex(text: str) -> str:
    """Put an answer into the form math_verify.parse extracts first: ``\\boxed{...}``.

    Text that already holds ``\\boxed``/``\\fbox`` is passed as is. Otherwise outer math delimiters
    (``$..$``, ``\\(..\\)``, ``\\[..\\]``) are removed, ``°`` becomes ``^\\circ``, lone ``$`` (currency)
    and a trailing period are dropped, and the rest is boxed.
    """
    s = text.strip()
    if "\\boxed" in s or "\\fbox" in s:
        return s
    m = _DELIMITED.fullmatch(s)
    if m:
        s = next(g for g in m.groups() if g is not None).strip()
    s = s.replace("°", "^\\circ")
    s = re.sub(r"(?<!\\)\$", "", s)
    s = _strip_trailing_period(s.strip())
    return "\\boxed{" + s + "}"


@dataclass(frozen=True)
class MathVerifier(Verifier):
    """Symbolic equivalence with math-verify (fractions vs decimals, radicals, sets, tuples,
    intervals, degrees, percent, ``\\text{}`` answers, thousands commas).

    Answer and gold are each wrapped as ``\\boxed{...}`` before ``math_verify.parse``. The answer is
    valid when parsing yields at least one sympy object (a bare string fallback such as ``???`` is
    not). A gold that does not parse is compared by ``normalize_answer`` only. Identical normal forms
    count as correct without calling sympy (fast path).
    """

    def check(self, answer: str, gold: str) -> Verdict:
        norm = normalize_answer(answer)
        if not norm:
            return Verdict(False, False)
        if norm == normalize_answer(gold):
            return Verdict(True, True)
        mv = _math_verify()
        parsed_answer = mv.parse(_as_boxed_latex(answer), parsing_timeout=None)
        if not any(not isinstance(p, str) for p in parsed_answer):
            return Verdict(False, False)
        parsed_gold = mv.parse(_as_boxed_latex(gold), parsing_timeout=None)
        if not parsed_gold:
            return Verdict(False, True)
        return Verdict(bool(mv.verify(parsed_gold, parsed_answer, timeout_seconds=None)), True)


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_NUMERIC_FORMS = [
    re.compile(rf"(?P<num>{_NUMBER})"),
    re.compile(rf"(?P<num>{_NUMBER})/(?P<den>{_NUMBER})"),
    re.compile(rf"(?P<sign>-?)\\[dt]?frac\{{(?P<num>{_NUMBER})\}}\{{(?P<den>{_NUMBER})\}}"),
]


def parse_number(text: str) -> float | None:
    """A float from a numeric answer, or None.

    Accepts ``42``, ``-3.5``, ``1e-3``, ``1,000``, ``3/4``, ``\\frac{3}{4}``, ``-\\dfrac{3}{4}``, with
    ``$``, ``\\text{}``, ``%``, degree marks, a trailing period and one trailing unit word (``18
    dollars``, ``5 cm``) ignored. Anything else (``5 or 6``, ``x=5``) is None.
    """
    s = _unwrap_text(text.strip())
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = _DEGREES.sub("", s)
    s = _LATEX_SPACES.sub(" ", s).strip()
    s = _strip_trailing_period(s).strip()
    s = re.sub(r"(?<=\d)\s*[A-Za-z]+$", "", s)  # one trailing unit word
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # thousands separators
    s = re.sub(r"\s+", "", s)
    for form in _NUMERIC_FORMS:
        m = form.fullmatch(s)
        if not m:
            continue
        groups = m.groupdict()
        try:
            value = Fraction(groups["num"])
            if groups.get("den") is not None:
                value /= Fraction(groups["den"])
        except (ValueError, ZeroDivisionError):
            return None
        if groups.get("sign") == "-":
            value = -value
        return float(value)
    return None


@dataclass(frozen=True)
class NumericVerifier(Verifier):
    """Numbers equal within ``tolerance``, relative or absolute (``math.isclose`` with both)."""

    tolerance: float = 1e-6

    def check(self, answer: str, gold: str) -> Verdict:
        value = parse_number(answer)
        if value is None:
            return Verdict(False, False)
        target = parse_number(gold)
        if target is None:
            raise ValueError(f"numeric verifier: gold {gold!r} is not a number")
        ok = math.isclose(value, target, rel_tol=self.tolerance, abs_tol=self.tolerance)
        return Verdict(ok, True)


@dataclass(frozen=True)
class ExactVerifier(Verifier):
    """Normalised string equality (strip, lowercase, no whitespace, no ``$``/``\\text{}``/trailing
    period). An answer that normalises to the empty string is invalid."""

    def check(self, answer: str, gold: str) -> Verdict:
        a = _exact_form(answer)
        if not a:
            return Verdict(False, False)
        return Verdict(a == _exact_form(gold), True)


_CHOICE_PATTERNS = [
    re.compile(r"\(?([A-Ja-j])\)?[.:]?"),  # whole answer: B, (B), B), B.
    re.compile(r"(?i:.*\banswer\b(?:\s+is)?)\s*:?\s*\(?([A-J])\b\)?.*", re.DOTALL),  # The answer is B
    re.compile(r"\(?([A-J])[).:]\s.*", re.DOTALL),  # B) 42, (B) 42, B. 42
]


def parse_choice(text: str) -> str | None:
    """The option letter (A-J, upper case) of a multiple-choice answer, or None."""
    s = _unwrap_text(text.strip()).replace("$", "").strip()
    s = re.sub(r"\\boxed\{([^{}]*)\}", r"\1", s).strip()
    for pattern in _CHOICE_PATTERNS:
        m = pattern.fullmatch(s)
        if m:
            return m.group(1).upper()
    return None


@dataclass(frozen=True)
class ChoiceVerifier(Verifier):
    """Multiple choice: the letters A-J must match. Invalid when no letter can be read."""

    def check(self, answer: str, gold: str) -> Verdict:
        letter = parse_choice(answer)
        if letter is None:
            return Verdict(False, False)
        target = parse_choice(gold)
        if target is None:
            raise ValueError(f"choice verifier: gold {gold!r} is not an option letter A-J")
        return Verdict(letter == target, True)


# Reference checks: what the reference scripts compare (github.com/2020-qqtcg/DRIFT, src/prompting.py
# normalize_answer; src/benchmark.py: get_answer_normalizer, get_answer_checker per --dataset).
# drift's own implementation of the same rules; tests/test_verify.py pins each with hand values.

_REF_WHITESPACE = re.compile(r"\s+")
_REF_FIRST_NUMBER = re.compile(r"(\d+(?:\.\d+)?)")  # unsigned: "-5" reads 5.0, as the reference
_REF_LETTER = re.compile(r"\b([A-J])\b", re.IGNORECASE)
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_REF_CHOICE_DATASETS = frozenset({"gpqa", "mmlu", "mmlu-redux", "mmlu_pro"})


def reference_plain_form(text: str) -> str:
    """Lower case, every whitespace character removed (the reference's default normaliser)."""
    return _REF_WHITESPACE.sub("", text.strip().lower()) if text else ""


def reference_choice_form(text: str) -> str:
    """The last standalone letter A-J (any case), lower-cased; else the plain form."""
    if not text:
        return ""
    letters = _REF_LETTER.findall(text.strip())
    return letters[-1].lower() if letters else reference_plain_form(text)


def _reference_text_form(text: str) -> str:
    return _REF_WHITESPACE.sub("", text.lower()).translate(_PUNCTUATION)


def _reference_first_number(text: str) -> float | None:
    m = _REF_FIRST_NUMBER.search(text) if text else None
    return float(m.group(1)) if m else None


def reference_theoremqa_form(text: str) -> str:
    """The first unsigned number, written without trailing zeros; else lower case without
    whitespace and punctuation."""
    if not text:
        return ""
    value = _reference_first_number(text)
    if value is None:
        return _reference_text_form(text)
    if value.is_integer():
        return str(int(value))
    written = str(value)
    return written.rstrip("0").rstrip(".") if "." in written else written


@dataclass(frozen=True)
class ReferenceVerifier(Verifier):
    """The reference scripts' check for ``dataset`` (their ``--dataset``): normalised strings equal.

    Plain datasets (MetaMathQA, MATH-500, GSM8K, MATH): lower case, no whitespace, so ``$18``,
    ``18.`` and ``\\text{18}`` are not ``18``. Multiple choice: the last standalone letter. TheoremQA:
    the first unsigned numbers equal as floats, else the texts without whitespace and punctuation;
    valid only when the answer holds a number. Otherwise an answer is invalid when its normal form
    is empty. drift's ``math``/``numeric``/``choice`` verifiers are stricter about what counts as
    the same answer and more lenient about how it is written (docs/reliability.md)."""

    dataset: str = "metamathqa"

    def _form(self, text: str) -> str:
        if self.dataset in _REF_CHOICE_DATASETS:
            return reference_choice_form(text)
        if self.dataset == "theoremqa":
            return reference_theoremqa_form(text)
        return reference_plain_form(text)

    def normal_form(self, answer: str) -> str:
        return self._form(self.read_answer(answer) or answer)

    def check(self, answer: str, gold: str) -> Verdict:
        answer = answer.strip()
        if self.dataset == "theoremqa":
            value, target = _reference_first_number(answer), _reference_first_number(gold)
            same = value is not None and target is not None and value == target
            same = same or _reference_text_form(answer) == _reference_text_form(gold)
            return Verdict(same, value is not None)
        form = self._form(answer)
        if not gold:
            return Verdict(False, form != "")
        return Verdict(form == self._form(gold), form != "")


_GOLD_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def is_plain_number(gold: str) -> bool:
    """A gold that is just a decimal number (``42``, ``-3.5``, ``1,234``): what ``auto`` reads as
    numeric. Fractions, LaTeX, units and expressions are not."""
    return _GOLD_NUMBER.fullmatch(gold.strip()) is not None


def resolve_kind(kind: str, golds: list[str], multiple_choice: bool) -> str:
    """The verifier kind for a data set: ``kind`` itself unless it is ``auto``, which gives
    ``choice`` for multiple-choice data, ``numeric`` when every gold is a plain number, ``math``
    otherwise."""
    if kind != "auto":
        return kind
    if multiple_choice:
        return "choice"
    if golds and all(is_plain_number(g) for g in golds):
        return "numeric"
    return "math"


def unreadable_gold(kind: str, gold: str) -> str | None:
    """Why verifier ``kind`` cannot read ``gold`` (None: it can). Checked for every gold before any
    generation, so a mismatch of data and verifier fails in seconds, not after the first turn."""
    if kind == "numeric":
        return None if parse_number(gold) is not None else "not a number"
    if kind == "choice":
        return None if parse_choice(gold) is not None else "not an option letter A-J"
    if kind == "exact":
        return None if _exact_form(gold) else "empty after normalisation"
    if kind == "math":
        return None if normalize_answer(gold) else "empty after normalisation"
    if kind == "reference":
        return None if gold.strip() else "empty"
    raise ValueError(f"unknown verifier kind {kind!r}")


def make_verifier(cfg: VerifierConfig) -> Verifier:
    if cfg.kind == "auto":
        raise ValueError("verifier kind auto must be resolved against the data first (resolve_kind)")
    common = {"timeout_s": cfg.timeout_s, "read": cfg.read}
    if cfg.kind == "math":
        return MathVerifier(**common)
    if cfg.kind == "numeric":
        return NumericVerifier(**common, tolerance=cfg.tolerance)
    if cfg.kind == "exact":
        return ExactVerifier(**common)
    if cfg.kind == "choice":
        return ChoiceVerifier(**common)
    if cfg.kind == "reference":
        return ReferenceVerifier(**common, dataset=cfg.reference_dataset)
    raise ValueError(f"unknown verifier kind {cfg.kind!r}")  # pragma: no cover - Literal-checked


# --------------------------------------------------------------------------------------------
# Gold extraction
# --------------------------------------------------------------------------------------------

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_BARE = re.compile(r"\\boxed\s+([^\s$]+)")
_METAMATH = re.compile(r"The answer is:", re.IGNORECASE)


def _last_boxed(raw: str) -> str | None:
    starts = list(_BOX_START.finditer(raw))
    bare = list(_BOX_BARE.finditer(raw))
    if bare and (not starts or bare[-1].start() > starts[-1].start()):
        return bare[-1].group(1)
    if not starts:
        return None
    i = starts[-1].end()
    depth = 1
    while i < len(raw):
        ch = raw[i]
        if ch == "\\":
            i += 2  # an escaped character (\{, \}) does not open or close a group
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return raw[starts[-1].end() : i]
        i += 1
    raise ValueError(f"gold: unbalanced braces in the last \\boxed{{...}} of {raw[-200:]!r}")


def extract_gold(raw: str, style: GoldStyle = "auto") -> str:
    """The gold answer inside a dataset's answer field.

    plain: the text, stripped. gsm8k: the text after the last ``####``, commas removed. boxed: the
    content of the last ``\\boxed{...}``/``\\fbox{...}`` (balanced braces). metamath: the text after
    the last ``The answer is:``. auto: gsm8k if ``####`` occurs, else metamath if ``The answer is:``
    occurs, else boxed if a box occurs, else plain. Raises ValueError when the style's marker is
    missing or the gold is empty.
    """
    if style == "auto":
        if "####" in raw:
            style = "gsm8k"
        elif _METAMATH.search(raw):
            style = "metamath"
        elif _BOX_START.search(raw) or _BOX_BARE.search(raw):
            style = "boxed"
        else:
            style = "plain"

    if style == "plain":
        gold = raw.strip()
    elif style == "gsm8k":
        if "####" not in raw:
            raise ValueError(f"gold style gsm8k: no '####' marker in {raw[-200:]!r}")
        gold = raw.rsplit("####", 1)[1].strip().replace(",", "")
    elif style == "boxed":
        boxed = _last_boxed(raw)
        if boxed is None:
            raise ValueError(f"gold style boxed: no \\boxed{{...}} or \\fbox{{...}} in {raw[-200:]!r}")
        gold = boxed.strip()
    elif style == "metamath":
        matches = list(_METAMATH.finditer(raw))
        if not matches:
            raise ValueError(f"gold style metamath: no 'The answer is:' in {raw[-200:]!r}")
        gold = _strip_trailing_period(raw[matches[-1].end() :].strip()).strip()
    else:
        raise ValueError(f"unknown gold style {style!r}: expected auto, plain, gsm8k, boxed or metamath")

    if not gold:
        raise ValueError(f"gold style {style}: the gold answer is empty in {raw[-200:]!r}")
    return gold
