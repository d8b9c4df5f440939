"""nanoalign/experiment.py, the runner the experiments share: jobs run their commands in order, in parallel,
skip when finished, start again from nothing when interrupted, and a failure names the job, command and log."""
import json
import os
import sys

import pytest

from nanoalign import experiment
from nanoalign.train import REPO_ROOT


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_commands_run_in_order_with_one_thread_and_the_job_is_marked_done(tmp_path):
    job = experiment.Job("a/seed0", tmp_path / "a", [
        py("import os, pathlib; pathlib.Path('{0}').write_text(os.environ['OMP_NUM_THREADS'])".format(tmp_path / "x")),
        py("import pathlib; p = pathlib.Path('{0}'); p.write_text(p.read_text() + ' second')".format(tmp_path / "x"))])
    experiment.run_jobs([job], parallel=1)
    assert (tmp_path / "x").read_text() == "1 second"
    assert json.loads((tmp_path / "a" / experiment.DONE).read_text())["wall_s"] >= 0
    assert (tmp_path / "a" / "commands.txt").read_text().count("python -c") == 2
    # finished: run again, nothing runs
    (tmp_path / "x").write_text("untouched")
    experiment.run_jobs([job], parallel=1)
    assert (tmp_path / "x").read_text() == "untouched"


def test_an_interrupted_job_starts_again_from_an_empty_directory(tmp_path):
    run_dir = tmp_path / "b"
    run_dir.mkdir()
    (run_dir / "half_written.txt").write_text("from the interrupted run")
    experiment.run_jobs([experiment.Job("b", run_dir, [py("print('hello')")])])
    assert not (run_dir / "half_written.txt").exists()
    assert "hello" in (run_dir / "log.txt").read_text()


def test_jobs_run_side_by_side(tmp_path):
    """Two jobs that each wait for the other's file can only finish if they run at the same time."""
    wait = "import pathlib, time; pathlib.Path('{me}').touch(); t = time.time()\n" \
           "while not pathlib.Path('{other}').exists():\n    time.sleep(0.05); assert time.time() - t < 30"
    a, b = tmp_path / "a.flag", tmp_path / "b.flag"
    jobs = [experiment.Job("a", tmp_path / "a", [py(wait.format(me=a, other=b))]),
            experiment.Job("b", tmp_path / "b", [py(wait.format(me=b, other=a))])]
    experiment.run_jobs(jobs, parallel=2)
    assert all((tmp_path / n / experiment.DONE).exists() for n in "ab")


def test_a_failure_names_the_job_the_command_and_the_log_and_later_jobs_never_start(tmp_path):
    jobs = [experiment.Job("bad/seed1", tmp_path / "bad", [py("raise SystemExit('error: --beta=-1: must be positive')")]),
            experiment.Job("later", tmp_path / "later", [py("print(1)")])]
    with pytest.raises(RuntimeError) as e:
        experiment.run_jobs(jobs, parallel=1)
    message = str(e.value)
    assert message.startswith("bad/seed1: `python -c raise SystemExit") and "failed (exit 1)" in message
    assert "error: --beta=-1: must be positive" in message and str(tmp_path / "bad" / "log.txt") in message
    assert "\n" not in message
    assert not (tmp_path / "bad" / experiment.DONE).exists() and not (tmp_path / "later").exists()


def test_duplicate_job_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        experiment.run_jobs([experiment.Job("a", tmp_path / "1", []), experiment.Job("a", tmp_path / "2", [])])


def test_script_finds_the_repository_scripts_from_anywhere_and_shell_line_reads_like_typing():
    command = experiment.script("train_dpo.py", "--seed=1", "--out_dir=exp/x")
    assert command == [sys.executable, str(REPO_ROOT / "train_dpo.py"), "--seed=1", "--out_dir=exp/x"]
    assert experiment.shell_line(command) == "python train_dpo.py --seed=1 --out_dir=exp/x"
    assert experiment.script("-m", "nanoalign.evaluate", "--limit=3") == [sys.executable, "-m", "nanoalign.evaluate",
                                                                           "--limit=3"]


def test_write_results_writes_json_and_the_mean_std_table(tmp_path):
    results = {"title": "T", "metrics": ["m"], "arms": {"x": {"m": [1.0, 3.0]}, "y": {"m": [2.0, 2.0]}}}
    table = experiment.write_results(tmp_path, results)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert "| x | 2 | 2.0 ± 1.4 |" in table and (tmp_path / "results.md").read_text() == "# T\n\n" + table


def test_a_finished_job_runs_again_when_its_commands_changed(tmp_path):
    out = tmp_path / "x"
    experiment.run_jobs([experiment.Job("a", tmp_path / "a", [py(f"open('{out}', 'w').write('lr 1')")])])
    experiment.run_jobs([experiment.Job("a", tmp_path / "a", [py(f"open('{out}', 'w').write('lr 1')")])])
    out.write_text("kept")
    experiment.run_jobs([experiment.Job("a", tmp_path / "a", [py(f"open('{out}', 'w').write('lr 1')")])])
    assert out.read_text() == "kept"  # same commands: skipped
    experiment.run_jobs([experiment.Job("a", tmp_path / "a", [py(f"open('{out}', 'w').write('lr 2')")])])
    assert out.read_text() == "lr 2"  # other flags: run again


def test_a_finished_job_runs_again_when_an_input_it_names_is_rewritten(tmp_path):
    """A job records what its commands name outside its directory (a model it starts from, a data file); a model
    retrained since (rewritten, even to the same bytes) makes it run again, where its command lines alone match."""
    model, out = tmp_path / "model", tmp_path / "x"
    model.mkdir()
    (model / "weights").write_text("v1")

    def job():
        return experiment.Job("a", tmp_path / "a", [py(f"import sys; open('{out}', 'a').write('ran ')") + [
            f"--init={model}", f"--out_dir={tmp_path / 'a' / 'run'}"]])

    assert experiment.inputs(job()) == [model]  # its own directory's paths are outputs, not inputs
    experiment.run_jobs([job()])
    done = json.loads((tmp_path / "a" / experiment.DONE).read_text())
    assert done["inputs"] == {str(model): [["weights", 2, (model / "weights").stat().st_mtime_ns]]}
    experiment.run_jobs([job()])
    assert out.read_text() == "ran "  # unchanged inputs: skipped
    (model / "weights").write_text("v1")  # retrained to the same bytes: another modification time
    os.utime(model / "weights", ns=(0, (model / "weights").stat().st_mtime_ns + 1))
    experiment.run_jobs([job()])
    assert out.read_text() == "ran ran "
    (model / "new_shard").write_text("w")  # a file more
    experiment.run_jobs([job()])
    assert out.read_text() == "ran ran ran "


def test_write_results_under_another_name(tmp_path):
    results = {"metrics": ["m"], "arms": {"x": {"m": [1.0]}}}
    experiment.write_results(tmp_path, results, "results_dpo")
    assert json.loads((tmp_path / "results_dpo.json").read_text()) == results
    assert (tmp_path / "results_dpo.md").exists() and not (tmp_path / "results.json").exists()
