"""The README's examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs_and_its_assertions_hold():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def test_ci_runs_the_readme_test_command():
    readme = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = next(line.split("#")[0].strip() for line in readme.splitlines()
                        if "pytest" in line and "pip install" in line)
    assert test_command in ci
