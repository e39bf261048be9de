"""Pictures of a run: training curves from log.jsonl, and Delta per model with its error bars.

    python plot.py out/demo1/seed0/score                 # -> out/demo1/seed0/score/curves.png
    python plot.py out/demo1/seed0/score out/demo1/seed0/no_shaping --out curves.png   # runs overlaid
    python plot.py out/demo1/seed0/score --report report.json  # greedy figures of an evaluation as markers
    python plot.py --table results.json --out delta.png  # Delta per row, with error bars
    python plot.py --edit-hist report.json --out edits.png  # edit-distance ratio between the attempts, per row

Curves: accuracy at turn 1 and turn 2 of the sampled rollouts, i->c and c->i, KL per turn, then
whatever else the log holds (loss, gradient norm, lengths, cut attempts, seconds per step). Each
step is a faint dot; the line is a centred moving average over --smooth steps. Where an evaluation
is known (--report, or RUN_DIR/../report.json as run.sh writes it, for the checkpoints that lie in
RUN_DIR), its greedy accuracies and corrections are dashed horizontal lines. The share of rollouts whose
answer changed between the attempts (log field "changed", the paper's Figure 6b) has its own panel. The
held-out evaluations a run makes during training (records with eval_* fields: eval_acc_t1, eval_acc_t2,
eval_delta, ...) are a panel "held-out (greedy)", one point per evaluation; the training panels ignore those
records. Logs without these fields plot as before.

Edit histogram (--edit-hist): evaluate.py's report (its per-problem edit_ratios), one panel per row (a
row's seeds, ROW@SEED, pooled): the share of problems per bin of the edit-distance ratio between the first
and the second attempt (0: the same text, 1: nothing shared), its mean a vertical line (paper Figure 4a).

Table: evaluate.py --seeds's report.json (each row's Delta over seeds with its standard error), a JSON
list of rows {name, delta_mean, delta_se}, or evaluate.py's reports {name, delta}, drawn without error bars. Values are fractions, as
evaluate.py writes them; the picture shows percentage points.

matplotlib is an optional extra (pip install matplotlib): the core never imports it.
"""
import argparse
import json
import math
import os

import numpy as np

import data

MISSING = "plot.py: matplotlib is not installed (pip install matplotlib); no picture written"

# (title, y label, in percent, [(log field, legend label)]): a panel is drawn when its fields are in the log
PANELS = [
    ("accuracy of the sampled rollouts", "accuracy", True, [("acc_t1", "turn 1"), ("acc_t2", "turn 2"), ("acc_t3", "turn 3")]),
    ("changes from turn 1 to turn 2", "share of rollouts", True,
     [("delta_i2c", "i->c (wrong, then right)"), ("delta_c2i", "c->i (right, then wrong)")]),
    ("answer changed from the first attempt to the last (Figure 6b)", "share of rollouts", True, [("changed", "changed")]),
    ("KL(pi || pi_ref) per turn", "nats per attempt", False, [("kl_t1", "turn 1"), ("kl_t2", "turn 2"), ("kl_t3", "turn 3")]),
    ("loss", "loss", False, [("loss", "loss")]),
    ("gradient norm", "norm (before clipping)", False, [("grad_norm", "grad norm")]),
    ("attempt length", "tokens", False, [("len_y1", "turn 1"), ("len_y2", "turn 2"), ("len_y3", "turn 3")]),
    ("attempts cut at max_new_tokens", "share of attempts", True, [("cut", "cut")]),
    ("time per step", "seconds", False, [("t_sample", "sampling"), ("t_score", "scoring"), ("t_update", "update")]),
    ("sampler vs trainer log-probs", "mean |difference|", False, [("lp_mismatch", "lp mismatch")]),
]
# the held-out evaluations during training: drawn from the records that hold eval_* fields, point by point
HELD_OUT = ("held-out (greedy)", "accuracy", True,
            [("eval_acc_t1", "turn 1"), ("eval_acc_t2", "turn 2"), ("eval_acc_t3", "turn 3"),
             ("eval_delta", "Delta (t2 - t1)")])
GREEDY = ("acc_t1", "acc_t2", "delta_i2c", "delta_c2i")  # report fields drawn as markers
DASHES = ((5, 3), (1.5, 2), (8, 2, 2, 2))  # one dash pattern per report entry of a run (ckpt/, best/)
DASH_NAMES = ("dashed", "dotted", "dash-dot")
COLS, PANEL_W, PANEL_H, DPI = 3, 5.0, 4.0, 100  # curves: 3 panels a row, 500 x 400 pixels each


def pyplot_free_figure(**kw):
    """A matplotlib Figure drawn by the Agg canvas (no pyplot, no display), or the one-line exit."""
    try:
        import matplotlib  # noqa: F401  (first: a cached submodule would hide a missing package)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SystemExit(MISSING) from None
    fig = Figure(dpi=DPI, **kw)
    FigureCanvasAgg(fig)
    return fig


def read_log(path):
    """log.jsonl -> list of step records; a missing file or a bad line is a one-line exit naming it."""
    if not os.path.isfile(path):
        raise SystemExit(f"plot.py: {path}: no such file (RUN_DIR is a training run's --out)")
    recs = []
    try:
        for i, rec in data.read_jsonl(path):
            if not isinstance(rec.get("step"), int):
                raise SystemExit(f"plot.py: {path}:{i}: not a step record (a JSON object with an integer 'step')")
            for panel in PANELS + [HELD_OUT]:
                for field, _ in panel[3]:
                    v = rec.get(field)
                    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                        raise SystemExit(f"plot.py: {path}:{i}: {field} is {v!r}, not a number")
            recs.append(rec)
    except data.DataError as e:
        raise SystemExit(f"plot.py: {e}") from None
    if not recs:
        raise SystemExit(f"plot.py: {path}: no steps logged")
    return recs


def is_eval(rec):
    """Whether a log record is a held-out evaluation (eval_* fields) rather than a training step."""
    return any(k.startswith("eval_") for k in rec)


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise SystemExit(f"plot.py: {what} {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"plot.py: {what} {path}:{e.lineno}: not JSON ({e.msg})") from None


def report_entries(path):
    """An evaluate.py report (one dict, or a list of them) -> its entries that hold the greedy accuracies."""
    rep = read_json(path, "report")
    if isinstance(rep, dict) and isinstance(rep.get("checkpoints"), list):  # evaluate.py --seeds
        rep = rep["checkpoints"]
    rep = [rep] if isinstance(rep, dict) else rep
    if not isinstance(rep, list) or not all(isinstance(r, dict) and "acc_t1" in r and "acc_t2" in r for r in rep):
        raise SystemExit(f"plot.py: report {path}: not evaluate.py's report (dicts with acc_t1 and acc_t2)")
    return rep


def lies_in(ckpt, run, report_path):
    """Whether a report's ckpt path is inside run. evaluate.py stores the path as it was given: a relative
    one is the first that exists from the current directory or from a folder above the report."""
    if not isinstance(ckpt, str):
        return False
    bases, d = [os.getcwd()], os.path.dirname(os.path.abspath(report_path))
    while d not in bases:
        bases.append(d)
        d = os.path.dirname(d)
    found = [p for p in (os.path.join(b, ckpt) for b in bases) if os.path.exists(p)]
    path = ckpt if os.path.isabs(ckpt) else (found or [None])[0]
    return path is not None and os.path.realpath(path).startswith(os.path.realpath(run) + os.sep)


def find_reports(runs, report_paths):
    """Greedy evaluations per run: {run: [report entries]}. An entry goes to the run its ckpt lies in;
    a --report none of whose entries lies in any run is about every run (its checkpoints were moved)."""
    found = {run: [] for run in runs}
    for path in report_paths:
        rep = report_entries(path)
        hits = [(run, r) for r in rep for run in runs if lies_in(r.get("ckpt"), run, path)]
        for run, r in hits or [(run, r) for r in rep for run in runs]:
            found[run].append(r)
    for run in runs:  # run.sh's report, next to the runs
        auto = os.path.join(os.path.dirname(os.path.abspath(run)), "report.json")
        if auto not in [os.path.abspath(p) for p in report_paths] and os.path.isfile(auto):
            found[run] += [r for r in report_entries(auto) if lies_in(r.get("ckpt"), run, auto)]
    return found


def smooth(y, window):
    """Centred moving average over `window` steps (fewer at the ends), skipping missing values (nan)."""
    i, ok = np.arange(len(y)), ~np.isnan(y)
    lo, hi = np.maximum(i - (window - 1) // 2, 0), np.minimum(i + window // 2 + 1, len(y))  # window points
    s = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    n = np.concatenate([[0], np.cumsum(ok)])
    cnt = n[hi] - n[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, (s[hi] - s[lo]) / cnt, np.nan)


def curves(logs, out, reports=None, window=9):
    """Training curves of one or more runs in one PNG.
    logs: {label: [step records]}; reports: {label: [evaluate.py report entries]} for greedy markers.
    Returns what was drawn, read back from the figure: {label: {field: y (n,), field + ' smooth': y (n,),
    'step': x (n,), 'greedy ' + field: one value per report entry}}, in the units shown (percent where
    the axis is in percent)."""
    reports = reports or {}
    train = {label: [r for r in recs if not is_eval(r)] for label, recs in logs.items()}
    held = {label: [r for r in recs if is_eval(r)] for label, recs in logs.items()}
    panels = [p for p in PANELS if any(f in r for f, _ in p[3] for recs in train.values() for r in recs)]
    if any(held.values()):  # beside the sampled rollouts' accuracy
        panels.insert(1, HELD_OUT)
    rows = math.ceil(len(panels) / COLS)
    fig = pyplot_free_figure(figsize=(COLS * PANEL_W, rows * PANEL_H), layout="constrained")
    from matplotlib.ticker import PercentFormatter  # after the check that matplotlib is there
    axes = fig.subplots(rows, COLS, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    several = len(logs) > 1
    drawn = {label: {} for label in logs}
    for ax, panel in zip(axes, panels):
        title, ylabel, pct, fields = panel
        scale = 100.0 if pct else 1.0
        for r_i, (label, recs) in enumerate((held if panel is HELD_OUT else train).items()):
            x = np.array([r["step"] for r in recs], dtype=float)
            for f_i, (field, name) in enumerate(fields):
                if not any(field in r for r in recs):
                    continue
                y = np.array([np.nan if r.get(field) is None else r[field] for r in recs], dtype=float) * scale
                color = f"C{r_i if several else f_i}"
                style = ("-", "--", ":", "-.")[f_i] if several else "-"
                if panel is HELD_OUT:  # a few greedy evaluations: each one a point, joined
                    line = ax.plot(x, y, "o" + style, color=color, lw=1.5, markersize=4,
                                   label=f"{label}: {name}" if several else name)[0]
                    drawn[label]["eval step"] = line.get_xdata()
                    drawn[label][field] = line.get_ydata()
                    continue
                dots = ax.plot(x, y, ".", color=color, alpha=0.25, markersize=4)[0]
                line = ax.plot(x, smooth(y, window), style, color=color, lw=1.8,
                               label=f"{label}: {name}" if several else name)[0]
                drawn[label]["step"] = dots.get_xdata()
                drawn[label][field] = dots.get_ydata()
                drawn[label][field + " smooth"] = line.get_ydata()
                for e_i, rep in enumerate(reports.get(label, []) if field in GREEDY else []):  # percent panels
                    if not isinstance(rep.get(field), (int, float)):
                        continue
                    v = rep[field] * scale
                    who = f"{label}: {name.split(' (')[0]} " if several else ""  # else its legend column says
                    hl = ax.axhline(v, color=color, ls=(0, DASHES[e_i % len(DASHES)]), lw=1.1, alpha=0.9,
                                    label=f"{who}greedy: {v:.1f}%")
                    drawn[label].setdefault("greedy " + field, []).append(hl.get_ydata()[0])
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if pct:
            ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=0))
            lo, hi = ax.get_ylim()
            if lo < 0 <= min(min(line.get_ydata(), default=0) for line in ax.get_lines()):
                ax.set_ylim(0, max(hi, 5))  # shares are never negative: no "-0%" below a flat line at 0
        ax.grid(alpha=0.3)
        if len(ax.get_legend_handles_labels()[1]) > 1:  # below the panel, a column per field
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=len(fields), frameon=False)
    for d in drawn.values():
        for k, v in d.items():
            d[k] = np.asarray(v, dtype=float)
    steps = "; ".join(f"{label}: {len(recs)} steps" + (f", {len(held[label])} held-out evaluations" if held[label] else "")
                      for label, recs in train.items())
    title = f"{steps}  (dots: each step; lines: centred mean over {window} steps)"
    evals = "; ".join((f"{label}: " if several else "") + ", ".join(
        f"{DASH_NAMES[i % len(DASHES)]} = {r.get('name', '?')}" for i, r in enumerate(reports[label]))
        for label in logs if reports.get(label))
    fig.suptitle(title + (f"\ngreedy evaluation: {evals}" if evals else ""), fontsize=11)
    fig.savefig(out)
    return drawn


def table_rows(rows, where="rows"):
    """Check a table: a list of {name, delta_mean, delta_se} or {name, delta}, or evaluate.py --seeds's
    report (its rows' delta mean and standard error); a one-line exit names the bad row."""
    if isinstance(rows, dict) and isinstance(rows.get("rows"), list):  # evaluate.py --seeds
        rows = [{"name": r.get("row"), "delta_mean": (r.get("delta") or {}).get("mean"),
                 "delta_se": (r.get("delta") or {}).get("se")} if isinstance(r, dict) else r for r in rows["rows"]]
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list) or not rows:
        raise SystemExit(f"plot.py: {where}: not a non-empty JSON list of rows")
    for i, r in enumerate(rows):
        mean = r.get("delta_mean", r.get("delta")) if isinstance(r, dict) else None
        se = r.get("delta_se") if isinstance(r, dict) else None
        if not isinstance(mean, (int, float)) or isinstance(mean, bool) or not abs(mean) <= 1 or \
                (se is not None and not (isinstance(se, (int, float)) and se >= 0)):
            raise SystemExit(f"plot.py: {where}: row {i}: needs name and delta_mean (and delta_se >= 0) or delta, "
                             f"as fractions (0.042 for +4.2 points); got {r!r}")
    return rows


def delta_bars(rows, out):
    """Delta(t1, t2) of each row as a horizontal bar, in percentage points, with +- one standard error
    where the row gives delta_se. Returns what was drawn, read back from the figure:
    {'delta': bar lengths (n,), 'se': error bar half-widths (n,), nan where a row has none}."""
    rows = table_rows(rows)
    fig = pyplot_free_figure(figsize=(8, 1.3 + 0.5 * len(rows)), layout="constrained")
    ax = fig.subplots()
    names = [str(r.get("name", f"row {i}")) for i, r in enumerate(rows)]
    mean = np.array([r.get("delta_mean", r.get("delta")) for r in rows], dtype=float) * 100
    se = np.array([np.nan if r.get("delta_se") is None else r["delta_se"] for r in rows], dtype=float) * 100
    y = np.arange(len(rows))[::-1]  # first row on top
    bars = ax.barh(y, mean, height=0.6, color=["C2" if m > 0 else "C3" for m in mean], alpha=0.8)
    has = ~np.isnan(se)
    eb = ax.errorbar(mean[has], y[has], xerr=se[has], fmt="none", ecolor="black", capsize=4, lw=1.2)
    for yi, m, s in zip(y, mean, np.nan_to_num(se)):  # the value beyond the bar's end and its error bar
        ax.annotate(f"{m:+.1f}" + (f" ± {s:.1f}" if s else ""), (m + math.copysign(s, m), yi),
                    xytext=(5 if m >= 0 else -5, 0), textcoords="offset points", va="center",
                    ha="left" if m >= 0 else "right", fontsize=9)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, names)
    lo, hi = np.nanmin(np.minimum(mean - np.nan_to_num(se), 0)), np.nanmax(np.maximum(mean + np.nan_to_num(se), 0))
    pad = 0.25 * max(hi - lo, 1.0)
    ax.set_xlim(lo - pad, hi + pad)
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:+g}" if v else "0")
    ax.set_xlabel("Delta(t1, t2) = accuracy at turn 2 - accuracy at turn 1 (percentage points)")
    ax.set_title("Delta per model" + (" (error bars: ± one standard error)" if has.any() else ""), fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(out)
    got_se = np.full(len(rows), np.nan)
    segs = eb.lines[2][0].get_segments() if has.any() else []
    got_se[np.flatnonzero(has)] = [(s[1][0] - s[0][0]) / 2 for s in segs]
    return {"delta": np.array([b.get_width() for b in bars]), "se": got_se}


EDIT_BINS = 20  # bins of width 0.05 over [0, 1]


def edit_rows(path):
    """An evaluate.py report -> {row: pooled per-problem edit ratios}, a row's seeds (ROW@SEED) pooled, in the
    report's order; a report without edit_ratios (older evaluate.py) is a one-line exit."""
    rows = {}
    for r in report_entries(path):
        ratios = r.get("edit_ratios")
        if not isinstance(ratios, list) or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in ratios):
            raise SystemExit(f"plot.py: report {path}: entry {r.get('name', '?')!r} has no per-problem edit_ratios "
                             "(numbers in [0, 1]); evaluate.py writes them since it reports edit_ratio")
        name = str(r.get("name", "?"))
        rows.setdefault(name.rpartition("@")[0] or name, []).extend(ratios)
    return rows


def edit_hist(rows, out):
    """Paper Figure 4a: per row, the share of problems in each bin of the edit-distance ratio between the
    attempts, one panel per row, the mean a dashed vertical line. Returns what was drawn, read back from the
    figure: {row: {'share': bar heights in percent (EDIT_BINS,), 'mean': the line's x}}."""
    n = len(rows)
    cols = min(n, COLS)
    fig = pyplot_free_figure(figsize=(cols * PANEL_W, math.ceil(n / cols) * PANEL_H), layout="constrained")
    from matplotlib.ticker import PercentFormatter
    axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False, sharex=True).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    edges, drawn = np.linspace(0.0, 1.0, EDIT_BINS + 1), {}
    for i, (ax, (row, ratios)) in enumerate(zip(axes, rows.items())):
        # bin k holds [k / EDIT_BINS, (k + 1) / EDIT_BINS), the last one 1.0 too (np.histogram's float edges
        # would put 0.3 below 0.30000000000000004)
        k = np.minimum(np.floor(np.asarray(ratios, dtype=float) * EDIT_BINS), EDIT_BINS - 1).astype(int)
        counts = np.bincount(k, minlength=EDIT_BINS)
        bars = ax.bar(edges[:-1], 100.0 * counts / max(len(ratios), 1), width=edges[1] - edges[0], align="edge",
                      color=f"C{i}", alpha=0.8, edgecolor="white")
        mean = float(np.mean(ratios)) if ratios else float("nan")
        line = ax.axvline(mean, color="black", ls="--", lw=1.2, label=f"mean {mean:.2f}")
        drawn[row] = {"share": np.array([b.get_height() for b in bars]), "mean": line.get_xdata()[0]}
        ax.set_title(f"{row} ({len(ratios)} problems)", fontsize=11)
        ax.set_xlabel("edit distance / longer attempt's length")
        ax.set_ylabel("share of problems")
        ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=0))
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    fig.suptitle("edit distance between the first and second attempt (0: the same text, 1: nothing shared)",
                 fontsize=11)
    fig.savefig(out)
    return drawn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="a training run's --out (holds log.jsonl)")
    p.add_argument("--out", help="the PNG to write, or a folder to write it in (default: RUN_DIR/curves.png with one "
                                 "run; delta.png beside --table)")
    p.add_argument("--report", action="append", default=[], help="an evaluate.py report.json; repeatable")
    p.add_argument("--smooth", type=int, default=9, metavar="W", help="lines: centred moving average over W steps "
                                                                     "(default: 9)")
    p.add_argument("--table", help="evaluate.py --seeds's report, JSON rows {name, delta_mean, delta_se}, or "
                                   "reports {name, delta}: bar chart")
    p.add_argument("--edit-hist", metavar="REPORT",
                   help="evaluate.py's report.json: a histogram per row of the edit-distance ratio between the "
                        "attempts (paper Figure 4a; default --out: edit_hist.png beside REPORT)")
    args = p.parse_args(argv)
    if sum(map(bool, (args.runs, args.table, args.edit_hist))) != 1:
        p.error("give RUN_DIRs, --table or --edit-hist, one of the three")
    if args.smooth < 1:
        p.error("--smooth must be at least 1")
    if args.out and os.path.isdir(args.out):  # a folder: the picture's usual name in it
        args.out = os.path.join(args.out, "delta.png" if args.table else "edit_hist.png" if args.edit_hist else "curves.png")
    elif args.out and not args.out.lower().endswith(".png"):  # matplotlib would add .png itself: say the real name
        args.out += ".png"
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise SystemExit(f"plot.py: --out {args.out}: its folder {os.path.dirname(os.path.abspath(args.out))} "
                         "does not exist")
    if args.table:
        out = args.out or os.path.join(os.path.dirname(args.table), "delta.png")
        delta_bars(table_rows(read_json(args.table, "table"), args.table), out)
    elif args.edit_hist:
        out = args.out or os.path.join(os.path.dirname(args.edit_hist), "edit_hist.png")
        edit_hist(edit_rows(args.edit_hist), out)
    else:
        if len(args.runs) > 1 and not args.out:
            p.error("several RUN_DIRs share one picture: name it with --out")
        out = args.out or os.path.join(args.runs[0], "curves.png")
        short = [os.path.basename(os.path.normpath(r)) for r in args.runs]  # stage2, ablation, ... if distinct
        labels = short if 1 < len(set(short)) == len(short) else [os.path.normpath(r) for r in args.runs]
        logs = {lab: read_log(os.path.join(r, "log.jsonl")) for lab, r in zip(labels, args.runs)}
        reports = find_reports(args.runs, args.report)
        curves(logs, out, {lab: reports[r] for lab, r in zip(labels, args.runs)}, args.smooth)
    print(f"plot.py: wrote {out}")


if __name__ == "__main__":
    main()
