"""Every benchmark runs at a tiny size, so none can rot. The speed targets themselves are checked by running
the benchmarks (see the README's Performance section), never by timing a unit test."""
import json
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
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--threads=1", f"--json={out}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each prints at least one ratio against its peer measured in the same run
    ratios = re.findall(r"ratio nanoalign/(?:transformers|trl) = ([0-9.]+)x", proc.stdout)
    assert ratios and all(float(r) > 0 for r in ratios), proc.stdout[-2000:]
    # ... and each ratio is nanoalign's rate over its peer's, as printed and as saved (an inverted one would pass above)
    result = json.loads(out.read_text())
    rate = lambda r, side: r[side]["tokens_per_s"]  # noqa: E731
    if script.name == "bench_sft.py":
        saved = [(result["ratio"], rate(result, "nanoalign") / rate(result, "transformers"))]
    elif script.name == "bench_dpo.py":
        saved = [(result["tokens_per_s_ratio"], result["nanoalign"]["tokens_per_s_with_precompute"] / rate(result, "trl")),
                 (result["step_alone_ratio"], rate(result, "nanoalign") / rate(result, "trl"))]
    elif script.name == "bench_model.py":
        saved = [(result[k]["ratio"], rate(result[k], "nanoalign") / rate(result[k], "transformers"))
                 for k in ("generate", "train")]
    else:
        rollouts = result["rollouts"]
        saved = [(rollouts["ratio"], rate(rollouts, "nanoalign") / rate(rollouts, "transformers")),
                 (result["generation_share"], result["phase_s"]["generation"] / result["step_s"])]
    for value, expected in saved:
        assert value == pytest.approx(expected, rel=1e-9)
    assert f"= {saved[0][0]:.2f}x" in proc.stdout  # the first one saved is printed too
    if script.name == "bench_model.py":
        # fp32 greedy on the CPU: the two samplers' tokens agree to the last one, said and saved
        assert result["generate"]["identical_tokens"] is True, proc.stdout[-2000:]
        assert "generated tokens identical to transformers': True" in proc.stdout
        # the floor's percentage is decode time over the floor (an inverted one reads as "faster than memory")
        fl = result["floor"]
        assert fl["percent_of_floor"] == pytest.approx(100 * fl["decode_s_per_token"] / fl["floor_s_per_token"])
        assert fl["floor_s_per_token"] == pytest.approx(fl["streamed_bytes"] / fl["bandwidth_bytes_per_s"])
        assert f"= {fl['percent_of_floor']:.0f}% of the weight-streaming floor" in proc.stdout
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
