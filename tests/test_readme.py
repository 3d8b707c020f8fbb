"""The README's promises: two set-up commands, and CI runs the second one."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = ROOT.joinpath("README.md").read_text().split("```bash\n")[1:3]
    return [b.split("\n```")[0].strip() for b in blocks]


def test_readme_opens_with_demo_then_tests():
    demo, tests = readme_commands()
    assert demo.endswith("cmdfed demo") and "pytest" in tests
    assert "torch" not in demo  # the pin lives in pyproject.toml, not in the user's command


def test_ci_runs_the_readme_test_command():
    _, tests = readme_commands()
    assert tests in ROOT.joinpath(".ci", "run").read_text().splitlines()


def test_torch_is_pinned_to_the_local_cpu_wheel_version():
    pyproject = ROOT.joinpath("pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject
