"""The checkout installs with pip: `import normuon` then works from any folder, and no module
named `distributed` (Dask's import name) is installed."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pip_install_of_the_checkout_gives_import_normuon_only(tmp_path):
    source = tmp_path / "checkout"   # a copy: building writes build/ and *.egg-info beside it
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "normuon.py", "distributed.py", "train_gpt.py"):
        shutil.copy(ROOT / name, source / name)
    venv = tmp_path / "venv"
    # torch comes from this environment (--system-site-packages): only the package is new
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(source)],
                   check=True, timeout=300, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = subprocess.run(
        [str(python), "-c", "import normuon; print(normuon.__file__); print(normuon.NorMuon)"],
        cwd=elsewhere, capture_output=True, text=True, timeout=120, check=True).stdout
    assert str(venv) in found.splitlines()[0]
    files = subprocess.run([str(python), "-m", "pip", "show", "-f", "normuon"], cwd=elsewhere,
                           capture_output=True, text=True, timeout=120, check=True).stdout
    installed = {line.strip() for line in files.split("Files:")[1].splitlines()}
    assert "normuon.py" in installed
    assert not any(name.startswith(("distributed", "train_gpt")) for name in installed)
