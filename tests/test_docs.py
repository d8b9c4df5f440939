"""The documentation stays true: every test it cites exists, every methods.md section the code cites exists,
and the repository cites no notes that live outside it."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE = [*sorted((ROOT / "nanoalign").glob("*.py")), *sorted(ROOT.glob("*.py")), *sorted((ROOT / "bench").glob("*.py"))]


def cited_tests() -> list[tuple[str, str, str]]:
    """(document, test file, test name) for every `tests/test_x.py::test_y` a document cites."""
    return [(doc.name, file, name) for doc in DOCS
            for file, name in re.findall(r"(tests/test_\w+\.py)::(test_\w+)", doc.read_text())]


def test_every_cited_test_exists():
    missing = [f"{doc} cites {file}::{name}" for doc, file, name in cited_tests()
               if not (ROOT / file).is_file() or not re.search(rf"^def {name}\(", (ROOT / file).read_text(), re.M)]
    assert not missing, "; ".join(missing)
    assert len([c for c in cited_tests() if c[0] == "correctness.md"]) >= 40  # the notes really cite tests


def test_every_cited_methods_section_exists():
    headings = set(re.findall(r"^## (\d+\. .+)$", (ROOT / "docs" / "methods.md").read_text(), re.M))
    assert {h.split(".")[0] for h in headings} == {str(i) for i in range(1, 9)}
    cited = {(path.name, section) for path in CODE
             for section in re.findall(r'methods\.md,? "## ([^"]+)"', path.read_text())}
    assert cited, "no module cites a methods.md section: has the citation style changed?"
    missing = sorted((name, section) for name, section in cited if section not in headings)
    assert not missing, f"cited sections missing from docs/methods.md: {missing}"


def test_no_reference_to_notes_outside_the_repository():
    for path in CODE + DOCS + sorted((ROOT / "tests").glob("*.py")):
        if path.name == "test_docs.py":
            continue
        text = path.read_text()
        for outside in ("PITFALLS.md", "METHODS.md", "shared/docs"):
            assert outside not in text, f"{path.relative_to(ROOT)} mentions {outside}, which is not in the repository"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("pip install")]
    assert len(command) == 1 and f"```bash\n{command[0]}\n```" in readme
    assert "NANOALIGN_REQUIRE_REFERENCE=1" in command[0]
