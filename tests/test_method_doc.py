"""docs/method.md is what the formulas are checked against: the tests it names must exist, and every
``docs/method.md#anchor`` the code cites must be one of its headings (a renamed test or section
would otherwise leave the citation pointing at nothing)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHOD = ROOT / "docs" / "method.md"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", markdown, flags=re.M)}


def test_anchor_rule_by_hand():
    assert _anchor("Weight diagnostics") == "weight-diagnostics"
    assert _anchor("The method, as drift implements it") == "the-method-as-drift-implements-it"


def test_every_test_the_method_names_exists():
    text = METHOD.read_text()
    named: list[tuple[str, str]] = []
    current = None
    for m in re.finditer(r"`(tests/[\w/]+\.py)?::(\w+)`", text):
        current = m.group(1) or current  # "::name" alone continues the last file named
        named.append((current, m.group(2)))
    assert len(named) > 30  # the doc names its tests; a format change must not empty this check
    missing = [
        f"{path}::{name}"
        for path, name in named
        if not re.search(rf"^def {name}\(", (ROOT / path).read_text(), flags=re.M)
    ]
    assert missing == [], f"docs/method.md names tests that do not exist: {missing}"


def test_every_citation_of_the_method_resolves():
    known = anchors(METHOD.read_text())
    cited: dict[str, str] = {}
    for path in [*ROOT.glob("drift_core/*.py"), *ROOT.glob("tasks/**/*.py"), *ROOT.glob("flows/*.py")]:
        for anchor in re.findall(r"docs/method\.md#([\w\-]+)", path.read_text()):
            cited.setdefault(anchor, str(path.relative_to(ROOT)))
    assert {"return", "weights", "loss", "metrics"} <= set(cited)
    unknown = {a: where for a, where in cited.items() if a not in known}
    assert unknown == {}, f"citations of sections docs/method.md does not have: {unknown}"


def test_no_code_cites_a_file_outside_the_repository():
    stale = [
        str(p.relative_to(ROOT))
        for p in [*ROOT.glob("drift_core/*.py"), *ROOT.glob("tasks/**/*.py"), *ROOT.glob("flows/*.py")]
        if "DESIGN.md" in p.read_text() or "DESIGN item" in p.read_text()
    ]
    assert stale == []
