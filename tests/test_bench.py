"""Smoke tests of the bench/ scripts' small paths: they run and print the rows they should.
No timing is asserted."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_distributed_step_bench_prints_a_row_per_world_size():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "distributed_step.py"), "--worlds", "1", "2",
         "--layers", "1", "--scale", "8", "--repeats", "1", "--warmup", "0"],
        capture_output=True, text=True, timeout=300, check=True)
    rows = [line.split() for line in result.stdout.splitlines()]
    table = {row[0]: row for row in rows if row and row[0] in ("1", "2")}
    assert set(table) == {"1", "2"}
    sent, analytic = float(table["2"][3]), float(table["2"][4])
    assert abs(sent - analytic) <= 0.05 * analytic       # the 2 + 2 bytes per element
    assert "W=8" in result.stdout
