"""scripts/bench_table.py on a reduced CPU grid (tiny model): one row per size x batch x ratio with both sides
timed, the CSV, the markdown section and the plot written. Checks the tool works end to end, not its numbers."""
import csv
import subprocess
import sys

from conftest import REPO, binary


def test_reduced_grid_on_cpu(tiny_model, tmp_path):
    bin_dir = binary("tomeserve-bench").parent
    doc = tmp_path / "bench.md"
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_table.py"), "--model", tiny_model, "--label", "tiny grid",
         "--sizes", "64", "--batches", "1,2", "--ratios", "0,0.5", "--steps", "2", "--device", "cpu", "--dtype",
         "fp32", "--reps", "1", "--warmup", "0", "--threads", "1", "--bin", str(bin_dir), "--csv",
         str(tmp_path / "t.csv"), "--plot", str(tmp_path / "t.png"), "--doc", str(doc), "--section", "grid"],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [(r["batch"], r["ratio"]) for r in rows] == [("1", "0.0"), ("1", "0.5"), ("2", "0.0"), ("2", "0.5")]
    assert all(float(r["tomeserve_s"]) > 0 and float(r["diffusers_s"]) > 0 for r in rows), rows
    text = doc.read_text()
    assert "<!-- bench:grid -->" in text and text.count("| 64² |") == 4, text
    assert (tmp_path / "t.png").stat().st_size > 1000
