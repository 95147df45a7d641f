"""The `kdrun` command's own flags: --version, --help."""

import subprocess
import sys
from importlib.metadata import version

from conftest import kdrun


def test_version_prints_the_installed_version(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kdrun", "--version"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout == f"kdrun {version('kdrun')}\n"
    assert not (tmp_path / "outputs").exists()  # nothing composed or run


def test_help_fits_a_terminal_and_hides_private_presets(tmp_path):
    out = kdrun("--help", cwd=tmp_path).stdout
    groups = out.split("== Config groups (GROUP=OPTION) ==")[1].split("== Config ==")[0]
    assert "experiment/eskd: cifar10_eskd," in groups and "fashion_mnist_kd_early_teacher" in groups
    options = {o for line in groups.splitlines() for o in line.split(": ")[-1].replace(",", " ").split()}
    assert not [o for o in options if o.startswith("_")]  # _cifar10...: included by other presets, never chosen
    assert "wrn_40_2_wrn_40_1" in groups and "hydra" not in groups
    too_long = [line for line in out.splitlines() if len(line) > 100]
    assert not too_long, too_long
