"""The README promises that `.ci/run` runs exactly its set-up and test commands: the
commands of the README's "run the tests" block, split at the last `&&` into set-up and
tests, must be the commands `.ci/run` runs, in the same order."""

from __future__ import annotations

import re

from conftest import REPO_ROOT


def _readme_test_commands() -> list[str]:
    """The command lines of the README block that runs the tests (comments dropped)."""
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    (block,) = [b for b in blocks if "# 2. set up, then run the tests" in b]
    after = block.split("# 2. set up, then run the tests", 1)[1]
    return [line for line in after.splitlines()[1:] if line.strip() and not line.startswith("#")]


def _ci_commands() -> tuple[list[str], list[str]]:
    """(set-up commands, test commands) of .ci/run, by its section markers; a set-up line's
    `|| exit 1` is CI's own (stop at a failed set-up)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines():
        if line.startswith("# --- README: "):
            current = line.removeprefix("# --- README: ").split()[0]
            sections[current] = []
        elif current and line.strip() and not line.startswith("#"):
            sections[current].append(line)
    setup = [line.removesuffix(" || exit 1") for line in sections["set-up"]]
    tests = sections["tests"][:1]  # then CI's own handling of pytest's exit status
    return setup, tests


def test_ci_runs_exactly_the_readme_set_up_and_test_commands() -> None:
    readme = _readme_test_commands()
    setup, tests = _ci_commands()
    assert any("apt-get install" in line and "prometheus" in line for line in readme)
    # The README chains the last set-up command and the tests with `&&`; CI runs them apart.
    *readme_setup, last = readme
    last_setup, readme_tests = last.rsplit(" && ", 1)
    assert setup == [*readme_setup, last_setup]
    assert tests == [readme_tests] == [".venv/bin/python -m pytest -q"]
