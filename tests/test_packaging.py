"""The checkout installs with pip: `import normuon` then works from any folder, and no module
named `distributed` (Dask's import name) is installed. It does so whether the suite runs on the
system interpreter or inside a virtualenv, as many newcomers run it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def package_folders() -> list[str]:
    """Where the environment running this test keeps its packages (torch, pytest)."""
    return [entry for entry in sys.path if entry.endswith(("site-packages", "dist-packages"))]


def make_venv(path: Path, packages: list[str], with_pip: bool = True) -> Path:
    """A fresh virtualenv at `path` that also sees the package folders `packages`; returns its
    python.

    Not `--system-site-packages`: that gives the base interpreter's packages, so from inside a
    virtualenv the new one would have the base's torch, or none. Instead a .pth file in the new
    site-packages lists the folders, after the new environment's own."""
    subprocess.run([sys.executable, "-m", "venv", *([] if with_pip else ["--without-pip"]),
                    str(path)], check=True, timeout=300, capture_output=True)
    python = path / "bin" / "python"
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, timeout=120, capture_output=True, text=True).stdout.strip()
    (Path(site_packages) / "outer_environment.pth").write_text("\n".join(packages) + "\n")
    return python


def test_pip_install_of_the_checkout_gives_import_normuon_only(tmp_path):
    source = tmp_path / "checkout"   # a copy: building writes build/ and *.egg-info beside it
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "normuon.py", "distributed.py", "train_gpt.py"):
        shutil.copy(ROOT / name, source / name)
    venv = tmp_path / "venv"
    python = make_venv(venv, package_folders())   # torch comes from here: only normuon is new
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(source)],
                   check=True, timeout=300, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = subprocess.run(
        [str(python), "-c", "import normuon, torch; print(normuon.__file__); "
                            "print(torch.__file__)"],
        cwd=elsewhere, capture_output=True, text=True, timeout=120, check=True).stdout
    normuon_file, torch_file = found.splitlines()[-2:]
    assert str(venv) in normuon_file
    assert torch_file == torch.__file__      # the torch the suite runs on, not the base's
    files = subprocess.run([str(python), "-m", "pip", "show", "-f", "normuon"], cwd=elsewhere,
                           capture_output=True, text=True, timeout=120, check=True).stdout
    installed = {line.strip() for line in files.split("Files:")[1].splitlines()}
    assert "normuon.py" in installed
    assert not any(name.startswith(("distributed", "train_gpt")) for name in installed)


def test_the_install_test_passes_run_from_inside_a_virtualenv(tmp_path):
    # CI runs the suite on the system interpreter; this runs the test above as a newcomer
    # does, from a virtualenv (and, where the suite itself runs in one, from a venv in a venv).
    # The newcomer's torch is in their venv, not the base interpreter's: here the venv sees
    # this environment's packages under other paths (links), so a test that picked up the
    # base's torch would fail here as it does for them.
    aliases = []
    for i, folder in enumerate(package_folders()):
        alias = tmp_path / f"newcomer_packages_{i}" / "site-packages"
        alias.parent.mkdir()
        alias.symlink_to(folder, target_is_directory=True)
        aliases.append(str(alias))
    python = make_venv(tmp_path / "newcomer", aliases, with_pip=False)
    assert subprocess.run([str(python), "-c", "import sys; print(sys.prefix)"], check=True,
                          capture_output=True, text=True, timeout=60
                          ).stdout.strip() == str(tmp_path / "newcomer")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    run = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
         f"{Path(__file__)}::test_pip_install_of_the_checkout_gives_import_normuon_only"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "1 passed" in run.stdout
