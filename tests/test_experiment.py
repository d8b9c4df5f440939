"""nanoalign/experiment.py, the runner the experiments share: jobs run their commands in order, in parallel,
skip when finished, start again from nothing when interrupted, and a failure names the job, command and log."""
import json
import os
import re
import subprocess
import sys

import pytest

from nanoalign import experiment
from nanoalign.train import REPO_ROOT


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.parametrize("threads", [1, 3])
def test_commands_run_in_order_with_the_threads_asked_and_the_job_is_marked_done(tmp_path, capsys, threads):
    job = experiment.Job("a/seed0", tmp_path / "a", [
        py("import os, pathlib; pathlib.Path('{0}').write_text(' '.join(os.environ[k] for k in "
           "('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'TQDM_DISABLE')))".format(tmp_path / "x")),
        py("import pathlib; p = pathlib.Path('{0}'); p.write_text(p.read_text() + ' second')".format(tmp_path / "x"))])
    experiment.run_jobs([job], parallel=1, threads=threads)
    assert (tmp_path / "x").read_text() == f"{threads} {threads} 1 second"  # no progress bars in the logs
    wall = json.loads((tmp_path / "a" / experiment.DONE).read_text())["wall_s"]
    assert wall >= 0 and experiment.job_wall(tmp_path / "a") == wall
    assert (tmp_path / "a" / "commands.txt").read_text().count("python -c") == 2
    # finished: run again, nothing runs
    (tmp_path / "x").write_text("untouched")
    capsys.readouterr()
    experiment.run_jobs([job], parallel=1, threads=threads)
    assert (tmp_path / "x").read_text() == "untouched"
    assert "1 of 1 runs finished earlier: skipped" in capsys.readouterr().out


def test_an_interrupted_job_starts_again_from_an_empty_directory(tmp_path):
    run_dir = tmp_path / "b"
    run_dir.mkdir()
    (run_dir / "half_written.txt").write_text("from the interrupted run")
    experiment.run_jobs([experiment.Job("b", run_dir, [py("print('hello')")])])
    assert not (run_dir / "half_written.txt").exists()
    assert (run_dir / "log.txt").read_text() == "$ python -c print('hello')\nhello\n"  # each command above its output


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
    code = "print('step 1', flush=True); raise SystemExit('error: --beta=-1: must be positive')"
    jobs = [experiment.Job("bad/seed1", tmp_path / "bad", [py(code)]),
            experiment.Job("later", tmp_path / "later", [py("print(1)")])]
    with pytest.raises(RuntimeError) as e:
        experiment.run_jobs(jobs, parallel=1)
    # the log's last line: what went wrong, not the command line heading the log
    assert str(e.value) == (f"bad/seed1: `python -c {code}` failed (exit 1): error: --beta=-1: must be positive "
                            f"(log: {tmp_path / 'bad' / 'log.txt'})")
    assert not (tmp_path / "bad" / experiment.DONE).exists() and not (tmp_path / "later").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_command_killed_by_a_signal_is_a_failure_not_a_finished_job(tmp_path):
    """The OOM killer's SIGKILL: a negative return code, the job unfinished."""
    job = experiment.Job("oom", tmp_path / "oom", [py("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")])
    with pytest.raises(RuntimeError, match=r"^oom: `python -c .*` failed \(exit -9\)"):
        experiment.run_jobs([job])
    assert not (tmp_path / "oom" / experiment.DONE).exists()


def test_duplicate_job_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        experiment.run_jobs([experiment.Job("a", tmp_path / "1", []), experiment.Job("a", tmp_path / "2", [])])


def test_script_finds_the_repository_scripts_from_anywhere_and_shell_line_reads_like_typing():
    command = experiment.script("train_dpo.py", "--seed=1", "--out_dir=exp/x")
    assert command == [sys.executable, str(REPO_ROOT / "train_dpo.py"), "--seed=1", "--out_dir=exp/x"]
    assert experiment.shell_line(command) == "python train_dpo.py --seed=1 --out_dir=exp/x"
    assert experiment.script("-m", "nanoalign.evaluate", "--limit=3") == [sys.executable, "-m", "nanoalign.evaluate",
                                                                           "--limit=3"]


def test_write_results_writes_json_and_the_mean_std_table(tmp_path, capsys):
    results = {"title": "T", "metrics": ["m"], "arms": {"x": {"m": [1.0, 3.0]}, "y": {"m": [2.0, 2.0]}}}
    table = experiment.write_results(tmp_path, results)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert "| x | 2 | 2.0 ± 1.4 |" in table and (tmp_path / "results.md").read_text() == "# T\n\n" + table
    assert table in capsys.readouterr().out


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
    (model / "tokenizer").mkdir(parents=True)
    (model / "weights").write_text("v1")
    (model / "tokenizer" / "vocab").write_text("abc")

    def job():  # the script writes its --out_dir, inside the job's directory
        return experiment.Job("a", tmp_path / "a", [py(f"import os, sys; open('{out}', 'a').write('ran '); "
                                                       f"os.makedirs(sys.argv[-1].split('=', 1)[1], exist_ok=True)") + [
            f"--init={model}", f"--ref_model={model}", f"--out_dir={tmp_path / 'a' / 'run'}"]])

    world_file = (experiment.REPO_ROOT / "data" / "world.json").resolve()  # read by default, named by no flag
    assert experiment.inputs(job()) == [model, world_file]  # its own directory's paths are outputs; named once
    # the script a command runs is not an input (editing train_dpo.py does not rerun every experiment)
    script_job = experiment.Job("b", tmp_path / "b", [experiment.script("train_dpo.py", f"--init={model}")])
    assert experiment.inputs(script_job) == [model, world_file]
    experiment.run_jobs([job()])
    assert experiment.inputs(job()) == [model, world_file]  # its --out_dir exists now, and is still its own
    done = json.loads((tmp_path / "a" / experiment.DONE).read_text())
    assert done["inputs"][str(model)] == [  # every file under a directory, nested ones included, by relative path
        ["tokenizer/vocab", 3, (model / "tokenizer" / "vocab").stat().st_mtime_ns],
        ["weights", 2, (model / "weights").stat().st_mtime_ns]]
    assert sorted(done["inputs"]) == sorted([str(model), str(world_file)])
    experiment.run_jobs([job()])
    assert out.read_text() == "ran "  # unchanged inputs: skipped
    (model / "weights").write_text("v1")  # retrained to the same bytes: another modification time
    os.utime(model / "weights", ns=(0, (model / "weights").stat().st_mtime_ns + 1))
    experiment.run_jobs([job()])
    assert out.read_text() == "ran ran "
    (model / "new_shard").write_text("w")  # a file more
    experiment.run_jobs([job()])
    assert out.read_text() == "ran ran ran "
    (model / "tokenizer" / "vocab").write_text("abcd")  # a nested file rewritten
    experiment.run_jobs([job()])
    assert out.read_text() == "ran ran ran ran "


def test_a_finished_job_runs_again_when_the_world_is_rebuilt(tmp_path, monkeypatch):
    """The scripts read the held-out prompts (and R3 its PPO prompts) from data/ by default, naming no path: a
    world rebuilt with other fractions left every job skipped as done."""
    monkeypatch.setattr(experiment, "REPO_ROOT", tmp_path / "repo")
    (tmp_path / "repo" / "data").mkdir(parents=True)
    world_file = tmp_path / "repo" / "data" / "world.json"
    world_file.write_text('{"padded_demos": 0.9}')
    out = tmp_path / "x"
    job = experiment.Job("a", tmp_path / "a", [py(f"open('{out}', 'a').write('ran ')")])
    experiment.run_jobs([job])
    experiment.run_jobs([job])
    assert out.read_text() == "ran "
    world_file.write_text('{"padded_demos": 0.7}')
    experiment.run_jobs([job])
    assert out.read_text() == "ran ran "


def test_a_job_that_writes_a_path_it_names_outside_its_directory_is_finished(tmp_path):
    """The inputs are fingerprinted once the commands have run: a file a command writes outside the job's directory
    (here a shared log it names) is recorded as it is then, so the job is not run again for its own writing."""
    shared = tmp_path / "shared.log"

    def job():
        return experiment.Job("a", tmp_path / "a", [py(f"open('{shared}', 'a').write('ran ')") + [f"--log={shared}"]])

    experiment.run_jobs([job()])
    experiment.run_jobs([job()])
    assert shared.read_text() == "ran "


def test_write_results_under_another_name(tmp_path):
    results = {"metrics": ["m"], "arms": {"x": {"m": [1.0]}}}
    exp = tmp_path / "exp" / "dpo"  # not made yet: write_results makes it
    experiment.write_results(exp, results, "results_dpo")
    assert json.loads((exp / "results_dpo.json").read_text()) == results
    assert (exp / "results_dpo.md").exists() and not (exp / "results.json").exists()


def test_ensure_runs_the_command_only_when_the_path_is_missing(tmp_path):
    target = tmp_path / "sft" / "model"
    make = py(f"import os; os.makedirs('{target}'); open('{tmp_path / 'made'}', 'a').write('made ')")
    experiment.ensure(target, make)
    experiment.ensure(target, make)  # there now: not made again
    assert target.is_dir() and (tmp_path / "made").read_text() == "made "
    with pytest.raises(subprocess.CalledProcessError):  # a failed prerequisite stops the experiment
        experiment.ensure(tmp_path / "rm", py("raise SystemExit(3)"))


def test_read_json_of_a_run_that_did_not_finish_points_at_its_log(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'eval.json'}: missing (did the run finish? "
                                                          f"see {tmp_path / 'log.txt'})")):
        experiment.read_json(tmp_path / "eval.json")
    (tmp_path / "eval.json").write_text('{"win_rate": 0.5}')
    assert experiment.read_json(tmp_path / "eval.json") == {"win_rate": 0.5}
