"""The Makefile's test targets: `make test-gpu` runs the core's tests on a GPU image, which may have Ray installed
(then nothing skips the Ray layer's modules for it). Every module that runs Ray's jobs must be left out by name."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS_THE_RAY_LAYER = re.compile(r'"-m", "ray_jobs\.|^from test_(ray_jobs|tune_resume) import', re.M)


def ray_layer_tests() -> set[str]:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(r"^RAY_LAYER_TESTS\s*:=(.*)$", text, re.M)
    assert match, "Makefile: no RAY_LAYER_TESTS"
    return set(match.group(1).split())


def test_make_test_gpu_leaves_out_every_module_that_runs_ray_jobs():
    listed = ray_layer_tests()
    assert all((ROOT / name).is_file() for name in listed), sorted(n for n in listed if not (ROOT / n).is_file())
    running = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if RUNS_THE_RAY_LAYER.search(p.read_text())}
    assert "tests/test_ray_jobs.py" in running  # the pattern still finds what it is for
    assert running <= listed, sorted(running - listed)


def test_the_gpu_install_pins_torch_in_the_same_pip_command():
    """unsloth asks for any torchvision, and the newest needs a newer torch: a pip command that installs the gpu
    extra without torch pinned in it moves torch off 2.13.0 (a pin from an earlier command only makes pip prefer
    it). Every such command in the README and the Makefile names torch==2.13.0 itself."""
    text = (ROOT / "README.md").read_text() + (ROOT / "Makefile").read_text()
    commands = re.findall(r"pip install [^`\n&;]*\[[^\]\n]*\bgpu\b", text)
    assert commands, "no pip command installs the gpu extra"
    assert all("torch==2.13.0" in command for command in commands), commands
