"""Every ```python block of README.md runs as written.

Each block is self-contained: it runs in a fresh namespace, compiled with the README's own
line numbers, so a failure reads ``README.md:<line>`` in the traceback and in the message.
Blocks that only show a signature are fenced ```text, not ```python. The suite's 4 simulated
CPU devices (tests/conftest.py) are what a data-parallel block sees; blocks must not depend on
the device count.
"""

import pathlib
import re
import traceback

import pytest

# Many programs, each run briefly: compiled with XLA's backend optimisations off (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("fast_compilation")


README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<info>[^`]*)$")


def python_blocks(text: str) -> list[tuple[int, str]]:
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
            raise ValueError(f"README.md:{index + 1}: unclosed code fence")
        if opening["info"].strip().split(" ")[0] in ("python", "py"):
            indent = len(opening["indent"])
            blocks.append((index + 2, "\n".join(line[indent:] for line in lines[index + 1:end])))
        index = end + 1
    return blocks


BLOCKS = python_blocks(README.read_text())


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


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


# Blocks that build the ResNet MetaFGNet compile for a while: the full suite runs them.
@pytest.mark.parametrize("first_line, code",
                         [pytest.param(line, code, marks=pytest.mark.slow) if "MetaFGNet(" in code else (line, code)
                          for line, code in BLOCKS], ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(first_line, code):
    run_block(first_line, code)


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


def test_blocks_are_found_with_their_line_numbers():
    text = "# t\n```python\na = 1\n```\n\n```text\nf(x) -> y\n```\n  ```py\n  b = 2\n  ```\n"
    assert python_blocks(text) == [(3, "a = 1"), (10, "b = 2")]
    with pytest.raises(ValueError, match="README.md:2: unclosed"):
        python_blocks("x\n```python\na = 1\n")
