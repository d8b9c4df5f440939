"""Every benchmark runs at a tiny size, so none can rot. The speed targets themselves are checked by running
the benchmarks (see the README's Performance section), never by timing a unit test."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import reference
from nanoalign.generate import _onednn_packing_works

ROOT = Path(__file__).resolve().parents[1]
BENCHES = sorted((ROOT / "bench").glob("bench_*.py"))


def test_every_benchmark_is_covered():
    # a new benchmark joins this list
    assert [b.name for b in BENCHES] == ["bench_dpo.py", "bench_model.py", "bench_ppo.py", "bench_sft.py"]


@pytest.mark.parametrize("script", BENCHES, ids=lambda p: p.name)
def test_benchmark_runs_at_a_tiny_size(script, tmp_path):
    reference("transformers")  # every benchmark measures against transformers (bench_dpo: TRL on top of it)
    if script.name == "bench_dpo.py":
        reference("trl")
    proc = subprocess.run([sys.executable, str(script), "--quick", "--threads=1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each prints at least one ratio against its peer measured in the same run
    ratios = re.findall(r"ratio nanoalign/(?:transformers|trl) = ([0-9.]+)x", proc.stdout)
    assert ratios and all(float(r) > 0 for r in ratios), proc.stdout[-2000:]
    if script.name == "bench_model.py" and _onednn_packing_works():
        # the ceiling the prepacked matmuls put on the generation ratio: a whole generate() call takes at least its
        # decode steps' matmuls, so the measured ratio sits under it (a pass timed
        # without dividing by its repetitions would put the bound below it)
        bound = re.search(r"the generation ratio cannot exceed ([0-9.]+)x", proc.stdout)
        measured = re.search(r"^generation ratio nanoalign/transformers = ([0-9.]+)x", proc.stdout, re.M)
        assert bound and measured and float(measured[1]) <= float(bound[1]), proc.stdout[-2000:]
    if script.name == "bench_ppo.py":  # the three numbers: TRL's part says why when it cannot run
        assert re.search(r"^generation share of PPO wall time: \d+% \(target <= 50%\)$", proc.stdout, re.M), proc.stdout
        assert "ratio nanoalign/transformers = " in proc.stdout, proc.stdout
        assert ("ratio nanoalign/trl = " in proc.stdout) != ("vs TRL: not measured: " in proc.stdout), proc.stdout
