"""Every ```python block of README.md and of the documentation's pages (docs/*.md) runs as written.

Each block is self-contained: it runs in a fresh namespace, compiled with its page's own line
numbers, so a failure reads ``README.md:<line>`` or ``docs/<page>.md:<line>`` in the traceback,
in the message and in the test's id. Blocks that only show a signature are fenced ```text, not
```python. A block that needs what the test suite does not have (the real datasets, a finished
demo run) says so on the line before its fence, ``<!-- not run: REASON -->``, and is reported
as skipped with that reason. The suite's 4 simulated CPU devices (tests/conftest.py) are what a
data-parallel block sees; blocks must not depend on the device count.
"""

import pathlib
import re
import traceback

import pytest

# Many programs, each run briefly: compiled with XLA's backend optimisations off (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("fast_compilation")


ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<info>[^`]*)$")
NOT_RUN = re.compile(r"^\s*<!-- not run: (?P<reason>.+) -->$")


def python_blocks(text: str, filename: str = "README.md") -> list[tuple[int, str]]:
    """``(line of the block's first code line, code)`` for every fenced block whose info string
    is ``python`` or ``py``, dedented by its fence's indentation; raises on an unclosed fence."""
    lines = text.splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = next((j for j in range(index + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{filename}:{index + 1}: unclosed code fence")
        if opening["info"].strip().split(" ")[0] in ("python", "py"):
            indent = len(opening["indent"])
            blocks.append((index + 2, "\n".join(line[indent:] for line in lines[index + 1:end])))
        index = end + 1
    return blocks


def not_run_reasons(text: str) -> dict[int, str]:
    """``{line of the block's first code line: reason}`` for the blocks whose fence follows a
    ``<!-- not run: REASON -->`` line (blank lines between allowed)."""
    lines = text.splitlines()
    reasons = {}
    for index, line in enumerate(lines):
        marker = NOT_RUN.match(line)
        if marker is None:
            continue
        fence = next((j for j in range(index + 1, len(lines)) if lines[j].strip()), None)
        if fence is not None and FENCE.match(lines[fence]):
            reasons[fence + 2] = marker["reason"]
    return reasons


def page_blocks(page: pathlib.Path) -> list[tuple[str, int, str, str | None]]:
    """``(page's path from the repository root, first code line, code, reason not run or None)``."""
    name = page.relative_to(ROOT).as_posix()
    text = page.read_text()
    reasons = not_run_reasons(text)
    return [(name, line, code, reasons.get(line)) for line, code in python_blocks(text, name)]


BLOCKS = [block for page in PAGES for block in page_blocks(page)]


def _param(name: str, line: int, code: str, reason: str | None):
    marks = [pytest.mark.skip(reason=f"{name}:{line}: not run: {reason}")] if reason else []
    if "MetaFGNet(" in code:  # blocks that build the ResNet MetaFGNet compile for a while
        marks.append(pytest.mark.slow)
    return pytest.param(name, line, code, marks=marks, id=f"{name}:{line}")


def run_block(first_line: int, code: str, filename: str = "README.md") -> None:
    """Execute ``code`` as if it started at ``first_line`` of ``filename``; on failure, fail the
    test with the block's line, the failing line and the error."""
    failure = None
    try:
        exec(compile("\n" * (first_line - 1) + code, filename, "exec"), {"__name__": "__readme__"})
    except Exception as error:  # any error in a snippet, a SyntaxError included, is a failure to report
        frames = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if frame.filename == filename]
        line = error.lineno if isinstance(error, SyntaxError) else (frames[-1] if frames else None)
        where = f", line {line}" if line else ""
        failure = f"{filename} block at line {first_line} failed{where}: {type(error).__name__}: {error}"
    if failure:
        pytest.fail(failure, pytrace=False)


def test_the_readme_and_the_docs_have_python_blocks():
    names = [name for name, _, _, reason in BLOCKS if reason is None]
    assert names.count("README.md") >= 1 and len(names) - names.count("README.md") >= 3


# Blocks that build the ResNet MetaFGNet compile for a while: the full suite runs them.
@pytest.mark.parametrize("filename, first_line, code", [_param(*block) for block in BLOCKS])
def test_python_block_runs(filename, first_line, code):
    run_block(first_line, code, filename)


def test_ci_runs_the_readmes_test_command():
    """.ci/run installs the extras the README's test command does (the recipes' Equinox and
    Haiku included), so CI runs what a reader runs."""
    ci_command = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "recipes" in ci_command and ci_command in README.read_text()


def test_a_failing_block_is_reported_with_its_readme_line():
    """The harness itself: an error on the block's third line is reported at README line 12."""
    with pytest.raises(pytest.fail.Exception, match=r"block at line 10 failed, line 12: NameError: .*undefined_name"):
        run_block(10, "x = 1\ny = x + 1\nz = undefined_name\n")
    with pytest.raises(pytest.fail.Exception, match=r"block at line 10 failed, line 11: SyntaxError"):
        run_block(10, "x = 1\nf(x) -> y\n")
    with pytest.raises(pytest.fail.Exception, match=r"docs/page.md block at line 10 failed, line 11: ZeroDivisionError"):
        run_block(10, "x = 1\ny = x / 0\n", "docs/page.md")


def test_blocks_are_found_with_their_line_numbers():
    text = "# t\n```python\na = 1\n```\n\n```text\nf(x) -> y\n```\n  ```py\n  b = 2\n  ```\n"
    assert python_blocks(text) == [(3, "a = 1"), (10, "b = 2")]
    with pytest.raises(ValueError, match="README.md:2: unclosed"):
        python_blocks("x\n```python\na = 1\n")
    with pytest.raises(ValueError, match="docs/page.md:2: unclosed"):
        python_blocks("x\n```python\na = 1\n", "docs/page.md")


def test_a_block_marked_not_run_is_found_with_its_reason():
    text = "# t\n<!-- not run: needs the data -->\n\n```python\na = 1\n```\n\n```python\nb = 2\n```\n"
    assert python_blocks(text) == [(5, "a = 1"), (9, "b = 2")]
    assert not_run_reasons(text) == {5: "needs the data"}
