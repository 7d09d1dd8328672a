"""The documentation says what the code does: the config reference is the schema's, the README's commands are the
ones that run, and every link between the pages leads somewhere."""

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from dali_kd.config import Config
from dali_kd.config.reference import END, REFERENCE_PAGE, REGENERATE, START, main, render_reference

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_config_reference_is_what_the_schema_says():
    page = REFERENCE_PAGE.read_text(encoding="utf-8")
    committed = page.partition(START)[2].partition(END)[0].strip("\n")
    assert committed == render_reference(), (
        f"{REFERENCE_PAGE.relative_to(ROOT)}: the config reference differs from the schema's descriptions; "
        f"regenerate it: {REGENERATE}"
    )


def test_config_reference_lists_every_key():
    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            ann = field.annotation
            # An optional section (model.teacher: TeacherSpec | None) lists its keys as a section does.
            ann = next((a for a in typing.get_args(ann) if a is not type(None)), ann)
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from keys(ann, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    reference = REFERENCE_PAGE.read_text(encoding="utf-8")
    missing = [k for k in keys(Config) if f"| `{k}` |" not in reference]
    assert not missing, f"docs/config.md's config reference lacks: {missing}"


def test_reference_command_rewrites_a_stale_page_and_check_says_how(tmp_path, capsys):
    page = tmp_path / "config.md"
    page.write_text(f"# Config\n\nbefore\n\n{START}\n| old table |\n{END}\n\nafter\n", encoding="utf-8")

    assert main(["--page", str(page), "--check"]) == 1
    assert REGENERATE in capsys.readouterr().out
    assert main(["--page", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    assert "| old table |" not in text and "| `train.optimizer.lr` |" in text
    assert text.startswith("# Config\n\nbefore\n\n") and text.endswith(f"{END}\n\nafter\n")
    assert main(["--page", str(page), "--check"]) == 0


def test_reference_command_names_a_page_without_markers(tmp_path, capsys):
    page = tmp_path / "config.md"
    page.write_text("# Config\n", encoding="utf-8")
    assert main(["--page", str(page)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(page) in err[0] and "markers" in err[0]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.partition("## Quick start")[2]
    block = section.partition("```bash\n")[2].partition("```")[0]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_quick_start_runs_the_demo_and_the_tests_ci_runs():
    commands = _quick_start_commands()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    ci_test_command = ci[ci.index("# The README's test command:") + 1].strip()

    assert any(c.endswith("python -m dali_kd.train") for c in commands), commands
    assert ci_test_command in commands, f"the README's test command is not .ci/run's ({ci_test_command!r})"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens (headings in code blocks aside)."""
    anchors, in_code = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            heading = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", heading).replace(" ", "-"))
    return anchors


def test_every_link_between_the_pages_leads_somewhere():
    broken = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif (
                anchor
                and linked.suffix == ".md"
                and anchor not in _anchors(linked.read_text(encoding="utf-8"))
            ):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_the_install_pages_cuda_13_recipe_installs_every_dependency_but_the_cuda_12_dali():
    """docs/install.md installs dali_kd with --no-deps and names its dependencies itself: they must stay
    pyproject.toml's, with DALI's CUDA 13 build for the CUDA 12 one."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    required = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in required}
    page = (ROOT / "docs" / "install.md").read_text(encoding="utf-8")
    block = page.partition("pip install nvidia-dali-cuda130")[0].rpartition("```bash\n")[2]
    block += (
        "pip install nvidia-dali-cuda130"
        + page.partition("pip install nvidia-dali-cuda130")[2].partition("```")[0]
    )
    installed = {
        word.lower()
        for line in block.splitlines()
        if line.startswith("pip install")
        for word in line.split("#")[0].split()[2:]
        if not word.startswith("-") and word != "."
    }
    assert installed == names - {"nvidia-dali-cuda120"} | {"nvidia-dali-cuda130"}
