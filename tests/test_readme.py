"""The README's commands are the ones CI runs: a newcomer who follows the README gets what CI checks."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _code_block_after(text: str, heading: str) -> list[str]:
    section = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_install_lines_verbatim_and_in_order():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    install = _code_block_after(readme, "## Install")
    assert any("pip install" in line and ".[test]" in line for line in install), install
    positions = [ci.index(line) for line in install]  # ValueError: a README line CI does not run
    assert positions == sorted(positions)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = _code_block_after(readme, "## The two commands")
    test_command = next(line.split("#")[0].strip() for line in commands if "pytest" in line)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_test_extra_holds_what_the_tests_import():
    extras = (ROOT / "pyproject.toml").read_text()
    for package in ("pytest", "pytest-xdist", "torchvision", "expecttest", "timm", "onnx", "onnxruntime", "onnxscript"):
        assert f'"{package}"' in extras, package
