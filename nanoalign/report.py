"""A report you can look at: each run's metrics.jsonl drawn as PNG curves, and report.md with the numbers.

    python -m nanoalign.report out/sft out/rm out/dpo out/ppo --out=out/report
    python -m nanoalign.report exp/hbat --smooth=0.9

What it reads
- A run directory, as the training scripts write it: metrics.jsonl (one JSON object per line, each with "step"
  and numbers: loss, eval_loss, rm/accuracy, rewards/margins, objective/kl, eval/win_rate, ...; SFT records also
  carry a "phase") and, once the run has finished, eval.json (a flat dict of final numbers).
- An experiment directory: one sub-directory per arm holding one run per seed (exp/hbat/two_stage/seed0/,
  exp/hbat/two_stage/seed1/, ...; or the run itself, exp/hbat/two_stage/metrics.jsonl, for a single seed; an arm
  results.json names by a path, "dpo/hbat", is the directory exp/hbat/dpo/hbat/), and
  results.json, the numbers the experiment compares, one value per seed:

      {"title": "Hbat: two stages vs joint training",          (optional)
       "metrics": ["eval/win_rate", "closed_accuracy"],         (optional: the table's columns, in this order;
                                                                 else every metric, first seen first)
       "seeds": [0, 1],                                         (optional, shown in the report)
       "arms": {"two_stage": {"eval/win_rate": [0.61, 0.58], "closed_accuracy": [0.70, 0.74]},
                "joint":     {"eval/win_rate": [0.55, 0.57], "closed_accuracy": [0.81, 0.79]}}}

  The arms are listed in results.json's order. An experiment script writes it and its own markdown table:

      (exp_dir / "results.json").write_text(json.dumps(results, indent=2))
      (exp_dir / "results.md").write_text(report.summary_table(results))

What it writes under --out: report.md and figures/*.png, embedded by relative paths. Per run: one figure with a
panel per metric group present (GROUPS: loss, preference accuracy, reward, KL, win rate / quality, PPO
diagnostics, response length, gradient norm, learning rate), the table of final values (the last logged value
of every metric) and eval.json's numbers. Per experiment: the arms table (mean ± std over seeds, from
results.json; without it, from each seed's eval.json and last eval* values), and one figure per metric group,
a panel per metric with the arms overlaid: the mean over seeds, and a band from the lowest to the highest seed.

Decisions
- x is the step. A step logged twice keeps its last value. Seeds are averaged at the steps all of them logged.
- --smooth is the weight of an exponential moving average (0 = off) of the measured curves logged at most steps;
  the raw curve stays drawn faintly behind, so smoothing hides nothing (a spike included). Held-out metrics,
  logged every eval_every steps, are drawn as points joined by lines, and schedules (lr, the KL coefficient)
  as they are: neither is smoothed.
- ± is the sample standard deviation over seeds (ddof=1); with one seed the table shows the mean alone.
- matplotlib is an optional extra (`pip install -e .[plot]`), imported only when drawing, with the Agg backend
  (no display needed). Without it the report still holds every table, and one line says how to get the plots.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from .cli import ArgumentParser, InputError, check_output, finite_float, json_reason, run

DONE = "done"  # what nanoalign.experiment writes in a job's directory once every command of it succeeded

PLOT_HINT = "No plots: matplotlib is not installed (`pip install matplotlib`, or `pip install -e .[plot]`)."

# (panel title, y label, pattern): a metric is drawn in the first group whose pattern it matches (re.search);
# metrics matching none (throughput, log-probs) appear only in the tables
GROUPS = [
    ("loss", "loss", r"loss"),
    ("preference accuracy", "accuracy", r"accuracies$|^(rm|eval)/accuracy$"),
    ("reward", "reward", r"^objective/(scores|rlhf_reward|non_score_reward)$|rewards/|margins|^offset"),
    ("KL", "KL", r"(^|/)(kl|kl_coef|approx_kl)$"),
    ("win rate / quality", "fraction", r"win_rate|quality|closed_accuracy"),
    ("PPO diagnostics", "value",
     r"^ppo/(clipfrac|vf_clipfrac|ratio|explained_variance|logprob_gap|eos_fraction)$|^objective/entropy$"),
    ("response length", "tokens", r"response_length$"),
    ("gradient norm", "global L2 norm", r"^grad_norm$"),
    ("learning rate", "lr", r"^lr$"),
]
# schedules, not measurements: never smoothed
SCHEDULES = ("lr", "objective/kl_coef")


# --- reading

def load_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl; blank lines are skipped, a malformed one raises naming file:line."""
    path = Path(path)
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8").rstrip("\r\n"))  # a line cut short fails at its end
            except UnicodeDecodeError:
                raise InputError(f"{path}:{lineno}: not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON at column {e.colno} ({json_reason(e)})") from None
            if not isinstance(record, dict) or not _is_number(record.get("step")) or not math.isfinite(record["step"]):
                raise InputError(f"{path}:{lineno}: expected a JSON object with a finite numeric \"step\"")
            records.append(record)
    return records


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def series(records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric: (steps, values)} sorted by step, metrics in the order first logged. When the log holds several
    phases (pretrain, sft), each phase is its own curve, "loss [sft]"."""
    several = len({r.get("phase") for r in records}) > 1
    by_metric: dict[str, dict[float, float]] = {}
    for r in records:
        for key, value in r.items():
            if key != "step" and _is_number(value):
                phase = r.get("phase")  # (Hbat: the SFT stages' records carry one, the preference stages' none)
                name = f"{key} [{phase}]" if several and phase is not None else key
                by_metric.setdefault(name, {})[r["step"]] = float(value)  # a step logged again keeps its last value
    return {name: (np.array(sorted(d)), np.array([d[s] for s in sorted(d)])) for name, d in by_metric.items()}


def load_eval(run_dir: Path) -> dict:
    path = run_dir / "eval.json"
    if not path.is_file():
        return {}
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({json_reason(e)})") from None
    if not isinstance(result, dict):
        raise InputError(f"{path}: expected a JSON object of final numbers")
    return result


def check_results(results) -> None:
    """results.json's format (see the module docstring); a problem raises InputError naming the key."""
    if not isinstance(results, dict) or not isinstance(results.get("arms"), dict) or not results["arms"]:
        raise InputError('expected {"arms": {ARM: {METRIC: [one value per seed]}}}')
    for arm, metrics in results["arms"].items():
        if not isinstance(metrics, dict):
            raise InputError(f"arms.{arm}: expected {{METRIC: [one value per seed]}}")
        for metric, values in metrics.items():
            if not isinstance(values, list) or not all(_is_number(v) for v in values):
                raise InputError(f"arms.{arm}.{metric}: expected a list of numbers (one per seed), got {values!r:.60}")
    if not isinstance(results.get("title", ""), str) or not isinstance(results.get("seeds", []), list):
        raise InputError("title: expected a string; seeds: expected a list")
    if "metrics" in results and not (isinstance(results["metrics"], list)
                                     and all(isinstance(m, str) for m in results["metrics"])):
        raise InputError(f"metrics: expected a list of metric names, got {results['metrics']!r:.60}")


def load_results(path) -> dict:
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
        check_results(results)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({json_reason(e)})") from None
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    return results


def _natural(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]  # seed2 before seed10


def _runs(arm_dir: Path) -> list[Path]:
    """Every run of an arm, finished or not: arm_dir itself, or its seed directories that hold a metrics.jsonl."""
    if (arm_dir / "metrics.jsonl").is_file():
        return [arm_dir]
    return sorted((p for p in arm_dir.iterdir() if (p / "metrics.jsonl").is_file()), key=_natural)


def seed_dirs(arm_dir: Path) -> list[Path]:
    """The runs of an arm (_runs). Where an experiment made them (some hold DONE), only the finished ones, the
    others named on stderr: a seed that crashed or is still running would pull the arm's mean towards its
    unfinished numbers and cut every curve to its last step."""
    runs = _runs(arm_dir)
    if runs == [arm_dir]:
        return runs
    done = [p for p in runs if (p / DONE).is_file()]
    if done and len(done) < len(runs):
        left = ", ".join(p.name for p in runs if p not in done)
        print(f"{arm_dir}: left out {len(runs) - len(done)} unfinished run(s) ({left}): no {DONE} marker",
              file=sys.stderr)
    return done or runs


def load_run(path: Path) -> dict:
    metrics = path / "metrics.jsonl"
    records = load_metrics(metrics)
    if not records:
        raise InputError(f"{metrics}: no records (has the run logged a step yet?)")
    return {"path": path, "series": series(records), "eval": load_eval(path)}


def load_experiment(path: Path) -> dict:
    results = load_results(path / "results.json") if (path / "results.json").is_file() else None
    found = {p.name: seed_dirs(p) for p in sorted(path.iterdir(), key=_natural) if p.is_dir()}
    order = list(results["arms"]) if results else []
    for arm in order:  # an arm named by a path ("dpo/hbat": exp/hbat/dpo/hbat/seed0/...)
        if arm not in found and (path / arm).is_dir():
            found[arm] = seed_dirs(path / arm)
    order += [arm for arm, seeds in found.items() if seeds and arm not in order]
    arms = {arm: [load_run(s) for s in found.get(arm, [])] for arm in order}
    return {"path": path, "results": results, "arms": arms}


# --- numbers

def mean_std(values) -> str:
    """'0.512 ± 0.013': mean ± sample std (ddof=1), the std to 2 significant digits and the mean to as many
    decimals; one value: the mean alone."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return "-"
    if len(x) == 1:
        return f"{x[0]:.4g}"
    mean, std = x.mean(), x.std(ddof=1)
    if not np.isfinite(std):
        return f"{mean:.4g} ± {std:.2g}"
    if std <= 1e-12 * max(1.0, abs(mean)):  # equal values, up to the rounding of their mean: no spread
        return f"{mean:.4g} ± 0"
    decimals = min(8, max(0, 1 - math.floor(math.log10(std))))
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def summary_table(results: dict) -> str:
    """The arms of an experiment as a markdown table: one row per arm, mean ± sample std (ddof=1) over seeds of
    each metric (results.json's format, see the module docstring). Experiment scripts write it beside their
    results.json."""
    check_results(results)
    arms = results["arms"]
    metrics = results.get("metrics") or list(dict.fromkeys(m for values in arms.values() for m in values))
    lines = ["| arm | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for arm, values in arms.items():
        counts = sorted({len(values[m]) for m in metrics if m in values})
        seeds = "-" if not counts else str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        cells = [mean_std(values[m]) if m in values else "-" for m in metrics]
        lines.append(f"| {arm} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if _is_number(value):
        return str(value) if isinstance(value, int) else f"{value:.6g}"
    return value if isinstance(value, str) else json.dumps(value)


def _step(step) -> str:
    return str(int(step)) if float(step).is_integer() else f"{step:g}"


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """s_t = weight * s_(t-1) + (1 - weight) * x_t from s_0 = x_0; non-finite values are kept and skipped."""
    out, acc = values.astype(float), None
    for i, v in enumerate(values):
        if np.isfinite(v):
            acc = v if acc is None else weight * acc + (1 - weight) * v
            out[i] = acc
    return out


def groups_of(names) -> list[tuple[str, str, list[str]]]:
    """[(panel title, y label, metrics)] for the groups that have at least one of `names`."""
    out = []
    taken = set()
    for title, ylabel, pattern in GROUPS:
        members = [n for n in names if n not in taken and re.search(pattern, n.split(" [")[0])]
        taken.update(members)
        if members:
            out.append((title, ylabel, members))
    return out


def across_seeds(runs: list[dict], name: str, smooth: float):
    """(steps, mean, low, high, raw mean, style) of metric `name` over the seeds that logged it, at the steps all
    of them logged; low/high are the extreme seeds (after smoothing, when smoothed). style: "points" for metrics
    logged every eval_every steps, "smoothed", or "line"."""
    curves = [r["series"][name] for r in runs if name in r["series"]]
    steps = curves[0][0]
    for s, _ in curves[1:]:
        steps = np.intersect1d(steps, s)
    if len(steps) == 0:
        return None  # the seeds share no step
    longest = max(len(s) for r in runs for s, _ in r["series"].values())
    style = ("points" if len(curves[0][0]) < max(10, longest / 2) else
             "line" if smooth == 0 or name.split(" [")[0] in SCHEDULES else "smoothed")
    raw = np.stack([v[np.isin(s, steps)] for s, v in curves])
    drawn = raw if style != "smoothed" else np.stack([ema(v, smooth)[np.isin(s, steps)] for s, v in curves])
    return steps, drawn.mean(0), drawn.min(0), drawn.max(0), raw.mean(0), style


# --- drawing

def _matplotlib():
    """matplotlib's Figure and Agg canvas, or None where matplotlib cannot be imported (it is an optional extra)."""
    try:
        import matplotlib  # noqa: F401  (first, so a blocked or broken matplotlib fails here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def _grid(mpl, n: int, title: str):
    Figure, FigureCanvasAgg = mpl
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.8 * ncols, 3.4 * nrows + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.remove()
    fig.suptitle(title, fontsize=13)
    return fig, axes[:n]


def _color(i: int, n: int):
    """The i-th of n curves' colour: matplotlib's default cycle (10 colours) while it suffices, else tab20, so
    that up to 20 curves on one panel never share a colour."""
    import matplotlib

    return f"C{i}" if n <= 10 else matplotlib.colormaps["tab20"](i % 20)


def _draw(ax, curve, color, label: str, band: bool) -> None:
    if curve is None:
        return
    steps, mean, low, high, raw, style = curve
    if style == "points":
        ax.plot(steps, mean, "o-", color=color, markersize=3, linewidth=1.2, label=label)
    else:
        if style == "smoothed":  # the raw curve, faint, behind its moving average
            ax.plot(steps, raw, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, mean, color=color, linewidth=1.5, label=label)
    if band:
        ax.fill_between(steps, low, high, color=color, alpha=0.15, linewidth=0)


def _finish(ax, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.locator_params(axis="x", integer=True)
    ax.legend(fontsize=8)


def plot_run(mpl, run: dict, title: str, path: Path, smooth: float) -> bool:
    """One figure, a panel per metric group present, the group's metrics overlaid. False when nothing to draw."""
    groups = groups_of(list(run["series"]))
    if not groups:
        return False
    fig, axes = _grid(mpl, len(groups), title)
    for ax, (group, ylabel, names) in zip(axes, groups):
        for i, name in enumerate(names):
            _draw(ax, across_seeds([run], name, smooth), _color(i, len(names)), name, band=False)
        _finish(ax, group, ylabel)
    fig.tight_layout()
    fig.savefig(path)
    return True


def plot_experiment(mpl, arms: dict[str, list[dict]], title: str, group: tuple, path: Path, smooth: float) -> None:
    """One figure for a metric group: a panel per metric, the arms overlaid (mean over seeds, min-max band)."""
    name, ylabel, metrics = group
    fig, axes = _grid(mpl, len(metrics), f"{title}: {name}")
    for ax, metric in zip(axes, metrics):
        for i, (arm, runs) in enumerate(arms.items()):
            seeds = [r for r in runs if metric in r["series"]]
            if seeds:
                label = f"{arm} ({len(seeds)} seed{'s' * (len(seeds) > 1)})"
                _draw(ax, across_seeds(seeds, metric, smooth), _color(i, len(arms)), label,
                      band=len(seeds) > 1)
        _finish(ax, metric, ylabel)
    fig.tight_layout()
    fig.savefig(path)


# --- the report

def _slug(path: Path, taken: set) -> str:
    """A file name for the run's figures: its directory's name, with its parent's when two runs share it."""
    parts = [re.sub(r"[^\w.-]+", "_", p) for p in path.resolve().parts[1:]] or ["run"]
    for candidate in (parts[-1], "_".join(parts[-2:]), *(f"{parts[-1]}-{k}" for k in range(2, len(taken) + 3))):
        if candidate not in taken:
            taken.add(candidate)
            return candidate


def final_values_table(run: dict) -> str:
    lines = ["| metric | step | last value |", "|---|---|---|"]
    for name, (steps, values) in run["series"].items():
        value = float(values[-1])
        value = int(value) if value.is_integer() and abs(value) < 1e15 else value  # counts read as floats
        lines.append(f"| {name} | {_step(steps[-1])} | {_fmt(value)} |")
    return "\n".join(lines) + "\n"


def eval_table(result: dict) -> str:
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in result.items()]
    return "\n".join(lines) + "\n"


def fallback_results(arms: dict[str, list[dict]]) -> dict | None:
    """Without results.json: per arm and metric, each seed's eval.json numbers and last eval* values."""
    out = {}
    for arm, runs in arms.items():
        values: dict[str, list] = {}
        for r in runs:
            final = {name: float(v[-1]) for name, (_, v) in r["series"].items() if name.startswith("eval")}
            final.update({k: v for k, v in r["eval"].items() if _is_number(v) and k != "checkpoint_step"})  # no metric
            for k, v in final.items():
                values.setdefault(k, []).append(v)
        if values:
            out[arm] = values
    return {"arms": out} if out else None


def build_report(run_dirs, out_dir, smooth: float = 0.6) -> Path:
    """Read every run or experiment directory, draw the figures, write out_dir/report.md; returns its path."""
    if not 0 <= smooth < 1:
        raise InputError(f"--smooth={smooth}: must be in [0, 1)")
    loaded = []
    for d in map(Path, run_dirs):
        if not d.is_dir():
            raise InputError(f"{d}: no such run directory")
        has_seeds = any(p.is_dir() and _runs(p) for p in d.iterdir())  # load_experiment says what it leaves out
        if (d / "results.json").is_file() or (not (d / "metrics.jsonl").is_file() and has_seeds):
            loaded.append(("experiment", d, load_experiment(d)))
        elif (d / "metrics.jsonl").is_file():
            loaded.append(("run", d, load_run(d)))
        else:
            raise InputError(f"{d}: not a run directory (no metrics.jsonl) nor an experiment (no results.json, "
                             f"no ARM/SEED/metrics.jsonl)")

    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    mpl = _matplotlib()
    lines = ["# Training report", "", f"`python -m nanoalign.report {' '.join(map(str, run_dirs))}`", ""]
    if mpl is None:
        lines += [PLOT_HINT, ""]
    taken: set = set()
    n_figures = 0
    for kind, d, item in loaded:
        slug = _slug(d, taken)
        if kind == "run":
            lines += [f"## {d.name}", "", f"Run `{d}`.", ""]
            png = figures / f"{slug}.png"
            if mpl is not None and plot_run(mpl, item, d.name, png, smooth):
                lines += [f"![{d.name}]({png.relative_to(out_dir).as_posix()})", ""]
                n_figures += 1
            lines += ["### Final values", "", final_values_table(item)]
            if item["eval"]:
                lines += ["### Final evaluation (eval.json)", "", eval_table(item["eval"])]
            continue
        results, arms = item["results"], item["arms"]
        title = (results or {}).get("title") or d.name
        lines += [f"## {title}", "", f"Experiment `{d}`.", ""]
        if results and "seeds" in results:
            lines += [f"Seeds: {', '.join(map(str, results['seeds']))}.", ""]
        lines += ["Arms: " + "; ".join(f"{arm} ({', '.join(r['path'].name for r in runs) or 'no runs'})"
                                       for arm, runs in arms.items()) + ".", ""]
        table = results or fallback_results(arms)
        if table:
            source = "results.json" if results else "no results.json: each seed's eval.json and last eval* values"
            lines += [f"### Results ({source})", "", summary_table(table),
                      "Mean ± sample standard deviation (ddof=1) over seeds; one seed: the value alone.", ""]
        names = list(dict.fromkeys(n for runs in arms.values() for r in runs for n in r["series"]))
        for group in groups_of(names) if mpl is not None else []:
            png = figures / f"{slug}_{re.sub(r'[^a-z]+', '_', group[0].lower()).strip('_')}.png"
            plot_experiment(mpl, {a: r for a, r in arms.items() if r}, title, group, png, smooth)
            lines += [f"### {group[0]}", "", f"![{title}: {group[0]}]({png.relative_to(out_dir).as_posix()})", ""]
            n_figures += 1
    report = out_dir / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    print(f"wrote {report} with {n_figures} figure{'s' * (n_figures != 1)} in {figures}"
          + ("" if mpl is not None else f"\n{PLOT_HINT}"))
    return report


def main(argv=None) -> Path:
    ap = ArgumentParser(prog="python -m nanoalign.report", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description="Draw runs' metrics.jsonl as PNG curves and write report.md with the final values, "
                                    "eval.json and experiments' arms tables.")
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                    help="a run directory (metrics.jsonl, eval.json) or an experiment directory "
                         "(results.json, ARM/SEED/metrics.jsonl)")
    ap.add_argument("--out", default="out/report", help="where report.md and figures/ are written")
    ap.add_argument("--smooth", type=finite_float, default=0.6,
                    help="EMA weight for curves logged at every step, in [0, 1); 0: off (the raw curve stays drawn "
                         "faintly behind)")
    args = ap.parse_args(argv)
    check_output(args.out, "out", directory=True)
    return build_report(args.run_dirs, args.out, args.smooth)


if __name__ == "__main__":
    run(main, sys.argv[1:])
