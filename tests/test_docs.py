"""Every section the code cites ("§7.2", "§1.3–1.5", "conventions section 9") exists as a
numbered heading of docs/conventions.md, and the doc's section numbers are unique."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "conventions.md"
SOURCES = ROOT / "src" / "subtomo"

_NUMBER = r"\d+(?:\.\d+)*"
# "§7.2", "§ 1.3", "§5", ranges "§7.1-7.3" / "§7.1–7.3" / "§1-2"; a trailing full stop
# ("§7.4.") is not part of the number.
CITATION = re.compile(rf"§\s*({_NUMBER})(?:\s*[-–]\s*({_NUMBER}))?")
# the spelled-out form used in some docstrings: "relion5-conventions section 8"
SECTION_WORD = re.compile(rf"conventions(?:\.md)?,?\s+sections?\s+({_NUMBER})")
HEADING = re.compile(rf"^#{{1,6}}\s+({_NUMBER})\.?\s")


def _expand(first: str, last: str | None) -> list[str]:
    """A cited range as the sections it names: both ends, plus those between them when the
    ends are siblings ("7.1", "7.3" -> 7.1, 7.2, 7.3; "1", "2" -> 1, 2)."""
    if last is None:
        return [first]
    a, b = first.split("."), last.split(".")
    if len(a) == len(b) and a[:-1] == b[:-1] and int(a[-1]) <= int(b[-1]):
        stem = ".".join(a[:-1])
        return [f"{stem}.{i}" if stem else str(i) for i in range(int(a[-1]), int(b[-1]) + 1)]
    return [first, last]


def citations() -> dict[str, list[str]]:
    """Cited section -> the places (``path:line``) citing it, over src/subtomo's Python files."""
    found: dict[str, list[str]] = {}
    for path in sorted(SOURCES.rglob("*.py")):
        rel = path.relative_to(ROOT)
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            sections = [s for m in CITATION.finditer(line) for s in _expand(*m.groups())]
            sections += [m.group(1) for m in SECTION_WORD.finditer(line)]
            for section in sections:
                found.setdefault(section, []).append(f"{rel}:{lineno}")
    return found


def headings() -> list[str]:
    """Section numbers of the doc's numbered headings, in order (fenced code skipped)."""
    numbers, fenced = [], False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            numbers.append(m.group(1))
    return numbers


def test_range_parsing():
    found = [
        s for m in CITATION.finditer("(§7.1–7.3, § 5, §1-2; §7.4.)") for s in _expand(*m.groups())
    ]
    assert found == ["7.1", "7.2", "7.3", "5", "1", "2", "7.4"]
    assert [m.group(1) for m in CITATION.finditer("§5.2 steps 2–5")] == ["5.2"]
    assert _expand("1.4", "2.1") == ["1.4", "2.1"]


def test_code_cites_sections():
    assert citations(), "no § citations found in src/subtomo: has it moved?"


def test_every_citation_resolves():
    known = set(headings())
    unresolved = {s: places for s, places in citations().items() if s not in known}
    listing = "\n".join(
        f"  §{s}: {', '.join(places)}"
        for s, places in sorted(
            unresolved.items(), key=lambda kv: [int(x) for x in kv[0].split(".")]
        )
    )
    assert not unresolved, f"sections cited in src/subtomo but missing from {DOC.name}:\n{listing}"


def test_section_numbers_unique():
    numbers = headings()
    dupes = sorted(n for n, count in Counter(numbers).items() if count > 1)
    assert not dupes, f"section numbers used by more than one heading in {DOC.name}: {dupes}"
    assert {"0", "1", "1.3", "7.2", "12", "13"} <= set(numbers)
