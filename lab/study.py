"""The study: every objective, its remedies and ablations on the synthetic benchmark, equal budgets, three
shipped base models x four seeds, one table with effect sizes; and the validation sweep behind every
row's learning rate and the visual pairs' rules (the test split is never read there).

    python -m lab.study sweep --jobs 2      # val: every row at every rate of the grid -> OUT/sweep.md, OUT/lrs.json
    python -m lab.study --jobs 2            # test: every row at its val-chosen rate -> OUT/study.md/.json/.png
    python -m lab.study --lr-rule 1e-3      # every row at one common rate -> OUT/study-common.*

Rows run in this process, or with --jobs N in N processes of one thread each (one process per base and
seed, so that the rows of one seed share their preference data in order). Every run is reused while its
flags and its base's weights are unchanged.

Tests:  python -m pytest -q tests/world/test_benchmark.py
"""
import argparse
import contextlib
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

import data
import train
from guard import checkpoint
from world import mechanism, synthetic
from world.eval import auroc, paired_change, t975

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: assets/, train.py
LRS_FILE = os.path.join(ROOT, "assets", "study", "lrs.json")         # the sweep's choice per row (its lrs.json)


def main():
    if sys.argv[1:2] == ["sweep"]:
        return sweep_main(sys.argv[2:])
    return study_main(sys.argv[1:])


# -----------------------------------------------------------------------------
# the study: every objective and ablation on the synthetic benchmark, equal budgets, two base models x
# several seeds, one table; and the validation sweeps behind the chosen settings

STUDY_ROWS = [  # (name, train.py flags); every run also gets --steps (equal budgets), --seed, --base and its row's
    # learning rate: chosen on the val split for each row alike (`python -m lab.study sweep`, LRS_FILE), or one
    # common rate for all (--lr-rule)
    ("SFT on the chosen answers (control)", ["--objective", "sft"]),
    ("oracle: SFT on true presence labels", ["--objective", "oracle"]),
    ("lean: SFT on 'yes' to every presence question", ["--objective", "lean"]),
    ("DPO (text pairs, weights 1)", ["--objective", "dpo"]),
    ("DPO + NLL on the chosen answer (RPO)", ["--objective", "dpo", "--nll-weight", "1"]),
    ("DPO + anchor on the chosen reward (mDPO)", ["--objective", "dpo", "--anchor-weight", "1"]),
    ("MMedPO (text + visual)", []),
    ("MMedPO + NLL on the chosen answer (RPO)", ["--nll-weight", "1"]),
    ("MMedPO + anchor on the chosen reward (mDPO)", ["--anchor-weight", "1"]),
    ("MMedPO, text pairs only", ["--strategies", "text"]),
    ("MMedPO, visual pairs only", ["--strategies", "visual"]),
    ("MMedPO without CRS weights", ["--weighting", "none"]),
    ("MMedPO, global noise", ["--noise", "global"]),
    ("MMedPO, visual pairs at random, unchecked", ["--visual-items", "random", "--visual-check", "keep"]),
    ("HSCR", ["--objective", "hscr"]),
    ("FiRe-MPO (its authors' loss)", ["--objective", "fire"]),
    ("FiRe-MPO ablation v1: (v, y_w) > (v*, y_w)", ["--objective", "fire", "--fire-visual", "v1"]),
    ("FiRe-MPO ablation v2: (v, y_w) > (v*, y_l)", ["--objective", "fire", "--fire-visual", "v2"]),
]
ORACLE_ROW, LEAN_ROW = STUDY_ROWS[1][0], STUDY_ROWS[2][0]
CONTRASTS = [  # (what is compared, row, against row)
    ("MMedPO vs SFT control", "MMedPO (text + visual)", "SFT on the chosen answers (control)"),
    ("MMedPO vs DPO", "MMedPO (text + visual)", "DPO (text pairs, weights 1)"),
    ("RPO's NLL on MMedPO", "MMedPO + NLL on the chosen answer (RPO)", "MMedPO (text + visual)"),
    ("mDPO's anchor on MMedPO", "MMedPO + anchor on the chosen reward (mDPO)", "MMedPO (text + visual)"),
    ("checked, balanced visual pairs vs random", "MMedPO (text + visual)", "MMedPO, visual pairs at random, unchecked"),
    ("FiRe-MPO vs its ablation v1", "FiRe-MPO (its authors' loss)", "FiRe-MPO ablation v1: (v, y_w) > (v*, y_w)"),
    ("visual pairs vs none", "MMedPO (text + visual)", "MMedPO, text pairs only"),
    ("CRS weights vs none", "MMedPO (text + visual)", "MMedPO without CRS weights"),
    ("local vs global noise", "MMedPO (text + visual)", "MMedPO, global noise"),
]
STUDY_METRICS = [  # (column, how to read it from one evaluation, higher is better); the tie-proof headline first
    ("tb-order", lambda m: m["grounding"]["headline"]["tb_order"], True),
    ("Δnats", lambda m: m["grounding"]["headline"]["margin_diff"], True),
    ("VQA tb-order", lambda m: kinds_mean(m, VQA_KINDS, "tb_order"), True),
    ("VQA Δnats", lambda m: kinds_mean(m, VQA_KINDS, "margin_diff"), True),
    ("report tb-order", lambda m: kinds_mean(m, ("report",), "tb_order"), True),
    ("report Δnats", lambda m: kinds_mean(m, ("report",), "margin_diff"), True),
    ("pair-ord", lambda m: m["grounding"]["pair_order"], True),
    ("mAUROC", lambda m: m["grounding"]["macro_auroc"], True),
    ("ptx pair-ord", lambda m: m["grounding"]["per_finding"]["pneumothorax"]["pair_order"], True),
    ("bal-acc", lambda m: m["grounding"]["pope"]["accuracy"], True),
    ("cf-acc", lambda m: m["grounding"]["counterfactual"]["accuracy"], True),
    ("yes%", lambda m: m["grounding"]["pope"]["yes_ratio"], None),
    ("frag%", lambda m: m["fragments"]["share"], False),
    ("halluc", lambda m: m["prior_breaking"]["hallucination_rate"], False),
    ("pf-acc", lambda m: m["prior_breaking"]["accuracy_following"], True),
    ("closed", lambda m: m["closed"], True),
    ("BLEU", lambda m: 100 * m["bleu_mean"], True),
    ("CHAIR", lambda m: m["report_findings"]["chair"], False),
]


VQA_KINDS = tuple(k for k in synthetic.FAILURE_KINDS if k != "report")   # the failure kinds the VQA probes ask
SHARE_COLUMNS = ("tb-order", "Δnats", "VQA tb-order", "VQA Δnats", "report tb-order", "report Δnats")


def kinds_mean(m, kinds, key):
    """The mean of one grounding statistic over some of the world's failure kinds."""
    return sum(m["grounding"]["per_kind"][k][key] for k in kinds) / len(kinds)


BASE_ROW = "base (before training)"
STUDY_BASES, STUDY_SEEDS = [0, 1, 2], [0, 1, 2, 3]   # the full study: three shipped bases x four seeds


def study_main(argv):
    ap = argparse.ArgumentParser(prog="python -m lab.study", description="the synthetic benchmark study: every objective, "
                                 "remedy and ablation, equal budgets")
    ap.add_argument("--out", default="out/study", help="runs go to OUT/baseB/seedS/ROW-lrLR; reused when their flags are unchanged")
    ap.add_argument("--bases", type=int_list, default=STUDY_BASES,
                    help="base models: 0, 1 and 2 are shipped (assets/tiny-base, tiny-base-1, tiny-base-2); others are "
                    "built with seed b")
    ap.add_argument("--seeds", type=int_list, default=STUDY_SEEDS)
    ap.add_argument("--rows", type=int_list, default=None, help=f"row numbers 0..{len(STUDY_ROWS) - 1} (default: all)")
    ap.add_argument("--steps", type=int, default=144, help="optimizer steps of every row (MMedPO's 3 epochs)")
    ap.add_argument("--lr-rule", default="best", help="best: each row at its val-chosen rate (--lrs-file); a number: "
                    "every row at that one rate (written to study-common.*)")
    ap.add_argument("--lrs-file", default=LRS_FILE, help="the sweep's lrs.json: {row: rate}")
    ap.add_argument("--jobs", type=int, default=1, help="processes of one thread each, one (base, seed) at a time")
    ap.add_argument("--runs-only", action="store_true", help=argparse.SUPPRESS)   # a --jobs worker: runs, no table
    args = ap.parse_args(argv)
    if args.rows and max(args.rows) >= len(STUDY_ROWS):
        ap.error(f"--rows: row numbers are 0..{len(STUDY_ROWS) - 1}")
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out {args.out}: is a file; the study writes a folder of runs")
    try:
        lrs = row_lrs(args.lr_rule, args.lrs_file)
    except ValueError as e:
        ap.error(str(e))
    rows = [STUDY_ROWS[i] for i in args.rows] if args.rows else STUDY_ROWS
    if STUDY_ROWS[0] not in rows:  # the base row is read from the SFT control's "before"
        rows = [STUDY_ROWS[0]] + rows
    os.makedirs(args.out, exist_ok=True)
    bases, results, t0 = study_bases(args.out, args.bases), {}, time.time()
    runs = [(b, s) for s in args.seeds for b in args.bases]   # seed-major: a study cut short still spans the bases
    if args.jobs > 1:
        in_workers([(f"base{b}-seed{s}", ["--bases", str(b), "--seeds", str(s)]) for b, s in runs], args.jobs, args.out,
                   argv)
    for n, (b, s) in enumerate(runs):
        for name, flags in rows:
            t = time.time()
            log_path = os.path.join(args.out, f"base{b}-seed{s}-{slug(name)}-lr{lrs[name]}.log")
            results[(name, (b, s))], reused = run_study_row(args.out, b, bases[b], s, name, flags, args.steps, log_path,
                                                            lrs[name])
            g = results[(name, (b, s))]["after"]["grounding"]
            frag = results[(name, (b, s))]["after"]["fragments"]["share"]
            if not reused or not args.jobs > 1:
                print(f"run {n + 1}/{len(runs)} base {b} seed {s} | {name:44s} | lr {lrs[name]} | tb-order "
                      f"{g['headline']['tb_order']:.3f} | Δnats {g['headline']['margin_diff']:+.2f} | yes% "
                      f"{g['pope']['yes_ratio']:.3f} | frag% {frag:.3f} | {'reused' if reused else f'{time.time() - t:.0f}s'}",
                      flush=True)
    if args.runs_only:
        return
    names = [name for name, _ in rows]
    table = study_tables(names, results, runs)
    hashes = "\n".join(f"- base {b}: {bases[b]}, weights sha256 {weights_digest(bases[b])}" for b in args.bases)
    hashes += "\n\n" + visual_tool_line(args.seeds)
    # a study of some rows, bases or seeds only never replaces the full one: it goes to *-partial.*
    full = len(rows) == len(STUDY_ROWS) and set(STUDY_BASES) <= set(args.bases) and set(STUDY_SEEDS) <= set(args.seeds)
    stem = ("study" if args.lr_rule == "best" else "study-common") + ("" if full else "-partial")
    checkpoint.write_json(os.path.join(args.out, f"{stem}.json"),
                          [{"row": name, "base": b, "seed": s, "lr": lrs[name],
                            **{c: read(results[(name, (b, s))]["after"]) for c, read, _ in STUDY_METRICS},
                            "before": {c: read(results[(name, (b, s))]["before"]) for c, read, _ in STUDY_METRICS},
                            "mechanism": results[(name, (b, s))].get("mechanism", {})}
                           for name in names for b, s in runs], indent=1)
    command = (f"python -m lab.study --bases {','.join(map(str, args.bases))} --seeds {','.join(map(str, args.seeds))} "
               f"--steps {args.steps} --lr-rule {args.lr_rule}" + (f" --rows {','.join(map(str, args.rows))}" if args.rows else ""))
    rates = "\n".join(f"- {name}: {lrs[name]}" for name in names)
    checkpoint.atomic_write(os.path.join(args.out, f"{stem}.md"), lambda f: f.write(
        f"{command}\n\nLearning rates ({'chosen on val for each row: ' + args.lrs_file if args.lr_rule == 'best' else 'one common rate'}):\n"
        f"{rates}\n\n{hashes}\n\n{table}\n"))
    study_chart(names, results, runs, os.path.join(args.out, f"{stem}.png"))
    print("\n" + table + f"\n\nwritten to {args.out}/{stem}.md, {stem}.json and {stem}.png in {time.time() - t0:.0f}s")


def row_lrs(rule, path):
    """{row: learning rate}: one common rate (rule a number), or each row's val-chosen rate from the sweep's
    file (rule "best"), a row the file lacks at its objective's default (train.OBJECTIVES)."""
    if rule != "best":
        try:
            lr = float(rule)
            assert lr > 0 and math.isfinite(lr)
        except (ValueError, AssertionError):
            raise ValueError(f"--lr-rule: {rule!r} is neither best nor a positive number") from None
        return {name: rule for name, _ in STUDY_ROWS}
    chosen = {}
    if os.path.exists(path):
        try:
            chosen = checkpoint.read_json(path)
            assert isinstance(chosen, dict)
        except (ValueError, AssertionError):
            raise ValueError(f"--lrs-file {path}: not a JSON object of row: rate") from None
    objective = lambda flags: flags[flags.index("--objective") + 1] if "--objective" in flags else "mmedpo"
    return {name: str(chosen.get(name, train.OBJECTIVES[objective(flags)].lr)) for name, flags in STUDY_ROWS}


def int_list(text):
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: numbers >= 0, each once")
    return values


def study_bases(out, bases, log=print):
    """The base models of the study: base 0 is the shipped tiny base, base 1 the shipped
    assets/tiny-base-1 (the same recipe with seed 1; shipped, since float sums on another thread count
    give other bits and a base trained on them differs); base b > 1 is built once under OUT/base{b}/model."""
    paths, assets = {}, os.path.join(ROOT, "assets")
    for b in bases:
        shipped = os.path.join(assets, "tiny-base" if b == 0 else f"tiny-base-{b}")
        paths[b] = shipped if os.path.exists(os.path.join(shipped, "config.json")) else os.path.join(out, f"base{b}", "model")
        if not os.path.exists(os.path.join(paths[b], "config.json")):
            log(f"building base model {b} (seed {b}) -> {paths[b]}")
            synthetic.build_base(paths[b], seed=b, log=lambda *a: None)
    return paths


def visual_tool_line(seeds, n_test=200):
    """The visual tool of each seed (trained on that seed's SFT split) on that seed's test split."""
    scores = []
    for s in seeds:
        sft_images, _ = synthetic.make_synthetic(2000, s, 32, "train")
        test_images, _ = synthetic.make_synthetic(n_test, s, 32, "test")
        classifier = synthetic.SyntheticStore([], None, sft_images=sft_images).visual_tool(s, lambda *a: None).classifier
        scores.append(visual_tool_auroc(classifier, test_images))
    mean = {k: sum(sc[k] for sc in scores) / len(scores) for k in scores[0]}
    per_seed = ", ".join(f"{sc['any']:.3f}" for sc in scores)
    return (f"Visual tool (lesion classifier trained on each seed's SFT split), test AUROC over seeds {seeds}: any finding "
            f"{mean['any']:.3f} (per seed {per_seed}); " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items() if k != "any"))


def run_study_row(out, base, base_path, seed, name, flags, steps, log_path, lr=None):
    """One train.py run in this process (its output to log_path), reused when its flags and its base's
    weights are unchanged. Its folder is named for the row and its rate, so that neither the order of
    --rows nor the rule for rates mislabels a result."""
    objective = flags[flags.index("--objective") + 1] if "--objective" in flags else "mmedpo"
    lr = str(lr or train.OBJECTIVES[objective].lr)
    seed_dir = os.path.join(out, f"base{base}", f"seed{seed}")
    argv = ["--out", seed_dir, "--run-name", f"{slug(name)}-lr{lr}", "--seed", str(seed), "--base", base_path,
            "--steps", str(steps), "--lr", lr] + flags
    return run_cached(os.path.join(seed_dir, f"{slug(name)}-lr{lr}"), argv, base_path, log_path, name)


def study_tables(names, results, runs):
    """Markdown: every row's mean ± sd over the runs (base model x seed), then each row's paired
    difference from the base and from the SFT control, then the contrasts, with 95 % intervals."""
    fmt_ci = lambda m, h, up: (f"**{m:+.3f} [{m - h:+.3f}, {m + h:+.3f}]**" if up is not None and (m - h > 0 if up else m + h < 0)
                               else f"{m:+.3f} [{m - h:+.3f}, {m + h:+.3f}]")
    lines = [f"Means ± standard deviations over {len(runs)} runs (base model, seed): {', '.join(f'{b}/{s}' for b, s in runs)}.",
             "", "| run | " + " | ".join(c for c, _, _ in STUDY_METRICS) + " |", "|---|" + "---|" * len(STUDY_METRICS)]
    for name in [BASE_ROW] + names:
        cells = [mean_sd([value(results, name, r, read) for r in runs]) for _, read, _ in STUDY_METRICS]
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f} ± {sd:.3f}" if abs(m) < 10 else f"{m:.2f} ± {sd:.2f}"
                                                for m, sd in cells) + " |")
    shown = [c for c in STUDY_METRICS if c[0] in ("tb-order", "Δnats", "pair-ord", "bal-acc", "yes%", "frag%", "closed")]
    diff = lambda a, b, read: paired_ci([value(results, a, r, read) for r in runs], [value(results, b, r, read) for r in runs])
    sft = STUDY_ROWS[0][0]
    lines += ["", "Paired differences over the runs (mean [95 % interval]); **bold**: the interval excludes 0 in the "
              "better direction.", "", "| run | " + " | ".join(f"Δ{c} vs base" for c, _, _ in shown) +
              " | Δtb-order vs SFT | ΔΔnats vs SFT |", "|---|" + "---|" * (len(shown) + 2)]
    for name in names:
        cells = [fmt_ci(*diff(name, BASE_ROW, read), up) for _, read, up in shown]
        cells += [fmt_ci(*diff(name, sft, metric(col)), True) if name != sft and sft in names else ""
                  for col in ("tb-order", "Δnats")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if ORACLE_ROW in names:  # how much of what true labels teach does each row learn?
        gain = lambda name, read: sum(value(results, name, r, read) - value(results, BASE_ROW, r, read) for r in runs) / len(runs)
        lines += ["", "Share of the oracle's gain over the base that each row reaches (mean gain / the oracle's mean "
                  "gain; 1 = as much as supervision on the true labels, 0 = none, < 0 = worse than the base), on the "
                  "headline, on the VQA probes' failure kinds and on the report counterfactuals:", "",
                  "| run | " + " | ".join(SHARE_COLUMNS) + " |", "|---|" + "---|" * len(SHARE_COLUMNS)]
        for name in names:
            cells = [gain(name, metric(col)) / gain(ORACLE_ROW, metric(col)) if abs(gain(ORACLE_ROW, metric(col))) > 1e-9
                     else float("nan") for col in SHARE_COLUMNS]
            lines.append(f"| {name} | " + " | ".join(f"{c:+.2f}" for c in cells) + " |")
        lines += ["", "The gains behind those shares: each row's paired change from the base over the runs (mean [95 % "
                  "interval]; nats for Δnats), beside the oracle's:", "",
                  "| run | " + " | ".join(f"Δ{c}" for c in SHARE_COLUMNS) + " |", "|---|" + "---|" * len(SHARE_COLUMNS)]
        for name in names:
            cells = [fmt_ci(*diff(name, BASE_ROW, metric(col)), True) for col in SHARE_COLUMNS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += mechanism_lines(names, results, runs)
    bases = sorted({b for b, _ in runs})
    if len(bases) > 1:  # base models can differ in kind, not only in degree: each one's means
        lines += ["", "Per base model (mean over its seeds):", "",
                  "| run | " + " | ".join(f"{c} base {b}" for b in bases for c in ("tb-order", "Δnats", "pair-ord", "yes%")) + " |",
                  "|---|" + "---|" * (4 * len(bases))]
        cols = [c for c in STUDY_METRICS if c[0] in ("tb-order", "Δnats", "pair-ord", "yes%")]
        for name in [BASE_ROW] + names:
            cells = [mean_sd([value(results, name, r, read) for r in runs if r[0] == b])[0] for b in bases for _, read, _ in cols]
            lines.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    checks = [(name, r) for name in (ORACLE_ROW, LEAN_ROW) if name in names for r in runs
              if "pair_diffs" in results[(name, r)]["after"]["grounding"]]
    if checks:  # the instrument's two checks on every run: a run that fails them is flagged, not averaged in silently
        lines += ["", "The instrument's checks on every run (the paired change of the headline over the same pairs, "
                  "95 % interval over pairs): the oracle must raise it, the lean must not.", "",
                  "| row | base | seed | Δtb-order [95 %] | Δnats [95 %] | check |", "|---|---|---|---|---|---|"]
        for name, (b, s_) in checks:
            g = results[(name, (b, s_))]
            c = paired_change(g["before"]["grounding"], g["after"]["grounding"])
            ok = c["raises"] if name == ORACLE_ROW else not c["raises"]
            lines.append(f"| {name.split(':')[0]} | {b} | {s_} | {c['d_tb']:+.3f} [{c['d_tb'] - c['d_tb_ci']:+.3f}, "
                         f"{c['d_tb'] + c['d_tb_ci']:+.3f}] | {c['d_nats']:+.2f} [{c['d_nats'] - c['d_nats_ci']:+.2f}, "
                         f"{c['d_nats'] + c['d_nats_ci']:+.2f}] | {'pass' if ok else '**FAIL**'} |")
    contrasts = [c for c in CONTRASTS if c[1] in names and c[2] in names]
    if contrasts:
        shown = ("tb-order", "Δnats", "pair-ord", "mAUROC", "bal-acc", "frag%", "closed")
        lines += ["", "The questions (paired over the same runs):", "",
                  "| contrast | " + " | ".join(f"Δ{c}" for c in shown) + " |", "|---|" + "---|" * len(shown)]
        for what, a, b in contrasts:
            cells = [fmt_ci(*diff(a, b, read), up) for col, read, up in STUDY_METRICS if col in shown]
            lines.append(f"| {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


MECHANISM_TYPES = ("presence", "side", "heart", "what", "where", "report")


def mechanism_lines(names, results, runs):
    """Markdown: where each row's first step goes (the share of step 0's gradient by question type, all sources
    together, and the visual pairs' part of it) and how log P(chosen) moved on its training records (mean
    nats and the share that fell, presence and report questions), means over the runs (world/mechanism.py)."""
    def by_type(run, key, what):
        groups = results[run].get("mechanism", {}).get(key) or {}
        if what == "visual":
            return sum(v["share"] for k, v in groups.items() if k.startswith("visual/"))
        parts = [v for k, v in groups.items() if what == "all" or k.split("/")[1] == what or
                 what == "other" and k.split("/")[1] not in MECHANISM_TYPES]
        if key == "gradient":
            return sum(v["share"] for v in parts)
        n = sum(v["n"] for v in parts)
        return (sum(v["mean"] * v["n"] for v in parts) / n, sum(v["fell"] * v["n"] for v in parts) / n) if n else (float("nan"),) * 2
    avg = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    lines = ["", "What each row's mechanism did (world/mechanism.py; means over the runs): the share of step 0's "
             "gradient by question type (other: records without one of these types; the visual pairs' part in the "
             "last share column), then log P(chosen) after training minus before on the training records (nats; the "
             "share that fell):", "",
             "| run | " + " | ".join(f"step 0 {t}" for t in MECHANISM_TYPES + ("other",)) + " | step 0 visual | Δlog P presence | "
             "fell presence | Δlog P report | fell report | Δlog P all | fell all |",
             "|---|" + "---|" * (len(MECHANISM_TYPES) + 8)]
    for name in names:
        have = [(name, r) for r in runs if results[(name, r)].get("mechanism", {}).get("gradient")]
        if not have:
            continue
        cells = [avg([by_type(k, "gradient", t) for k in have]) for t in MECHANISM_TYPES + ("other", "visual")]
        moves = [[by_type(k, "chosen", t) for k in have if results[k]["mechanism"].get("chosen")]
                 for t in ("presence", "report", "all")]
        cells += [avg([m[i] for m in ms]) for ms in moves for i in (0, 1)]
        lines.append(f"| {name} | " + " | ".join(f"{c:+.2f}" for c in cells) + " |")
    fire = [(name, [results[(name, r)]["final_train"] for r in runs if "kl_share" in (results[(name, r)].get("final_train") or {})])
            for name in names]
    fire = [(name, v) for name, v in fire if v]
    if fire:  # does FiRe-MPO's KL act? its share of the loss and its terms at the last step (mean ± sd over runs)
        lines += ["", "FiRe-MPO's terms at its last step (mean ± sd over the runs): the KL term's share of the loss, "
                  "the token-level and visual ranking losses and the KL:", "",
                  "| run | KL share | L_tok | L_vis | L_KL |", "|---|---|---|---|---|"]
        for name, v in fire:
            lines.append(f"| {name} | " + " | ".join("{:.4f} ± {:.4f}".format(*mean_sd([x[k] for x in v]))
                                                    for k in ("kl_share", "l_tok", "l_vis", "l_kl")) + " |")
    visual = [(name, [results[(name, r)]["mechanism"]["visual"] for r in runs
                      if results[(name, r)].get("mechanism", {}).get("visual")]) for name in names]
    visual = [(name, v) for name, v in visual if v]
    if visual:  # what the noise did to the base, with its spread over the runs (one run's median is no evidence)
        lines += ["", "What the visual pairs' noise does to the base (mean ± sd over the runs): pairs kept, median and "
                  "share above 1 nat of log P(y_w | x) - log P(y_w | x*), the share of greedy answers it changes, and the "
                  "visual tool's own median fall in its finding's probability:", "",
                  "| run | pairs | median drop (nats) | > 1 nat | answer changed | tool's fall |", "|---|---|---|---|---|---|"]
        for name, v in visual:
            cells = [mean_sd([x["pairs"] for x in v]), mean_sd([x["median_drop"] for x in v]), mean_sd([x["share_above_1_nat"] for x in v]),
                     mean_sd([x["answer_changed"] for x in v if x.get("answer_changed") is not None] or [float("nan")]),
                     mean_sd([x["tool_fall_median"] for x in v if x.get("tool_fall_median") is not None] or [float("nan")])]
            lines.append(f"| {name} | " + " | ".join(f"{m:.2f} ± {e:.2f}" for m, e in cells) + " |")
    return lines


def study_chart(names, results, runs, path, width=980, bar=14):
    """Horizontal bars, one group per row: the headline's tie-banded order (blue) and the presence pairs'
    order (green), and the yes-ratio (grey), mean over runs with a line for ± one sd."""
    from PIL import Image, ImageDraw
    reads = [(metric("tb-order"), (60, 90, 200)), (metric("pair-ord"), (60, 160, 90)), (metric("yes%"), (150, 150, 150))]
    names = [BASE_ROW] + names
    left, top, row_h = 290, 40, 3 * bar + 10
    img = Image.new("RGB", (width, top + row_h * len(names) + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), "tie-banded order over the failure kinds (blue), presence pair order (green), yes-ratio (grey): "
                     "mean ± sd", fill="black")
    scale = width - left - 40
    for i, name in enumerate(names):
        y = top + i * row_h
        d.text((10, y + bar), name[:44], fill="black")
        for j, (read, colour) in enumerate(reads):
            m, sd = mean_sd([value(results, name, r, read) for r in runs])
            y0 = y + j * bar
            d.rectangle([left, y0, left + scale * m, y0 + bar - 2], fill=colour)
            d.line([left + scale * max(0, m - sd), y0 + bar // 2, left + scale * min(1, m + sd), y0 + bar // 2], fill="black")
            d.text((left + scale * m + 6, y0), f"{m:.2f}", fill="black")
    for x in (0, 0.25, 0.5, 0.75, 1.0):
        d.line([left + scale * x, top - 6, left + scale * x, top + row_h * len(names)], fill=(210, 210, 210))
        d.text((left + scale * x - 8, top + row_h * len(names) + 6), f"{x:.2f}", fill="black")
    img.save(path)


def metric(column):
    """How STUDY_METRICS reads `column` from one evaluation."""
    return next(read for col, read, _ in STUDY_METRICS if col == column)


def value(results, name, run, read):
    """A metric of one run of a row; the row "base (before training)" is the SFT control's 'before'."""
    if name == BASE_ROW:
        return read(results[(STUDY_ROWS[0][0], run)]["before"])
    return read(results[(name, run)]["after"])


def paired_ci(xs, ys):
    """Mean of the paired differences xs - ys and its 95 % t-interval (half-width; inf for one run)."""
    m, sd = mean_sd([x - y for x, y in zip(xs, ys)])
    return m, t975(len(xs) - 1) * sd / len(xs) ** 0.5 if len(xs) > 1 else float("inf")


def mean_sd(xs):
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def sweep_main(argv):
    """The validation runs behind the chosen settings, written with their command to OUT/sweep.md: the
    noise's effect on the base model (no training), then every study row on the val split at every rate of
    one grid, printed whole, and each row's choice (OUT/lrs.json, which the study reads from LRS_FILE).
    The test split is never read."""
    ap = argparse.ArgumentParser(prog="python -m lab.study sweep", description="validation sweeps behind the study's settings (val split only)")
    ap.add_argument("--out", default="out/sweep")
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    ap.add_argument("--rows", type=int_list, default=None, help=f"row numbers 0..{len(STUDY_ROWS) - 1} (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="processes of one thread each, one row at a time")
    ap.add_argument("--runs-only", action="store_true", help=argparse.SUPPRESS)   # a --jobs worker: runs, no table
    args = ap.parse_args(argv)
    lrs = args.lrs.split(",")
    for lr in lrs:
        try:
            assert float(lr) > 0 and math.isfinite(float(lr))
        except (ValueError, AssertionError):
            ap.error(f"--lrs: {lr!r} is not a positive number")
    if args.rows and max(args.rows) >= len(STUDY_ROWS):
        ap.error(f"--rows: row numbers are 0..{len(STUDY_ROWS) - 1}")
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out {args.out}: is a file; the sweep writes a folder of runs")
    rows = [STUDY_ROWS[i] for i in args.rows] if args.rows else STUDY_ROWS
    os.makedirs(args.out, exist_ok=True)
    if args.jobs > 1:
        in_workers([(f"sweep-row{i}", ["--rows", str(i)]) for i in (args.rows or range(len(STUDY_ROWS)))], args.jobs,
                   args.out, argv, ["sweep"])
    base = os.path.join(ROOT, "assets", "tiny-base")
    sweep_lines, chosen = lr_sweep(args.out, rows, lrs, base, quiet=args.jobs > 1)
    if args.runs_only:
        return
    lines = ["# Validation sweeps (val split; the test split is never read)", "",
             f"python -m lab.study sweep --lrs {args.lrs}" + (f" --rows {','.join(map(str, args.rows))}" if args.rows else ""),
             "", f"Base 0 weights sha256 {weights_digest(base)}", "", "## Does the noise hide the lesion from the base model?", ""]
    lines += noise_sweep(base)
    lines += ["", "## Every row on the val split (base 0, seed 0, 144 steps) at every rate", ""] + sweep_lines
    lines += ["", "Chosen per row (the highest tie-banded headline among the rates with at most 1 % broken answers; "
              "none within it: the lowest rate):", ""] + [f"- {name}: {lr}" for name, lr in chosen.items()]
    checkpoint.atomic_write(os.path.join(args.out, "sweep.md"), lambda f: f.write("\n".join(lines) + "\n"))
    checkpoint.write_json(os.path.join(args.out, "lrs.json"), chosen, indent=1)
    print(f"chosen: {chosen}\nwritten to {os.path.join(args.out, 'sweep.md')} and lrs.json (the study reads {LRS_FILE})")


def lr_sweep(out, rows, lrs, base, max_fragments=0.01, quiet=False):
    """Each row on the val split (base 0, seed 0, 144 steps) at each learning rate, one --out per row (its
    preference data built once, reused by its rates). The choice: the highest tie-banded headline among the
    rates with at most `max_fragments` broken answers (else the lowest rate).
    returns (markdown lines, {row: chosen rate})."""
    cols = [c for c in STUDY_METRICS if c[0] in SWEEP_COLUMNS]
    lines = ["| row | lr | " + " | ".join(c for c, _, _ in cols) + " |", "|---|---|" + "---|" * len(cols)]
    chosen = {}
    for name, flags in rows:
        folder, results = os.path.join(out, "sweep", slug(name)), {}
        os.makedirs(folder, exist_ok=True)
        for lr in lrs:
            argv = ["--out", folder, "--run-name", f"lr{lr}", *flags, "--eval-split", "val", "--steps", "144", "--lr", lr]
            t = time.time()
            results[lr], reused = run_cached(os.path.join(folder, f"lr{lr}"), argv, base,
                                             os.path.join(folder, f"lr{lr}.log"), name)
            a = results[lr]["after"]
            lines.append(f"| {name} | {lr} | " + " | ".join(f"{read(a):.3f}" for _, read, _ in cols) + " |")
            if not (quiet and reused):
                print(lines[-1] + ("" if reused else f" {time.time() - t:.0f}s"), flush=True)
        before = results[lrs[0]]["before"]
        lines.append(f"| {name} | (base) | " + " | ".join(f"{read(before):.3f}" for _, read, _ in cols) + " |")
        ok = [lr for lr in lrs if results[lr]["after"]["fragments"]["share"] <= max_fragments]
        chosen[name] = max(ok, key=lambda lr: results[lr]["after"]["grounding"]["headline"]["tb_order"]) if ok else \
            min(lrs, key=float)
    return lines, chosen


SWEEP_COLUMNS = ["tb-order", "Δnats", "pair-ord", "ptx pair-ord", "bal-acc", "yes%", "frag%", "closed", "BLEU"]


def noise_sweep(base_path, steps=(500, 999), heatmaps=("classifier", "detector", "mask"), n=128):
    """Does Strategy 2's noise hide the lesion from the base model? On val-split questions whose answer
    states a finding, per heatmap and diffusion step: the drop of log P(y_w) from the clean to the noised
    image (median, share above 1 nat) and the share of greedy answers the noise changes. No training."""
    import tempfile
    model, processor = checkpoint.load_model(base_path, torch.float32, torch.device("cpu"))
    sft_images, _ = synthetic.make_synthetic(2000, 0, 32, "train")
    images, qa = synthetic.make_synthetic(200, 0, 32, "val")
    store = synthetic.SyntheticStore(images, tempfile.mkdtemp(), sft_images=sft_images)
    items = [it for it in qa if it["type"] != "report" and not data.states_absence(it["answer"])][:n]
    rows, quiet = [], lambda *a: None
    seen = visual_tool_auroc(store.visual_tool(0, quiet).classifier, images)
    print(f"visual tool (lesion classifier, trained on the SFT split) on val: AUROC {seen['any']:.3f} for any finding; "
          + ", ".join(f"{k} {v:.3f}" for k, v in seen.items() if k != "any"), flush=True)
    for heatmap in heatmaps:
        tool = data.heatmap_tool(heatmap, store=store, log=quiet)
        for k in steps:
            pairs = data.build_visual_pairs(items, store, tempfile.mkdtemp(), tool, "local", k, 0, log=quiet)
            mechanism.answer_change(model, processor, pairs, "plain", False, 48, log=quiet)
            dataset = data.RecordDataset(pairs, processor, data.model_image_reader(False))
            batches = [list(range(i, min(i + 64, len(pairs)))) for i in range(0, len(pairs), 64)]
            with torch.no_grad():
                logps = torch.cat([data.response_logps(model, batch, 2)[1].sum(-1) for batch in
                                   train.record_loader(dataset, batches, processor.tokenizer.pad_token_id, 0)])
            drop = (logps[:, 0] - logps[:, 1]).numpy()
            rows.append((heatmap, k, len(pairs), float(np.median(drop)), float((drop > 1).mean()),
                         float(np.mean([p["answer_changes"] for p in pairs]))))
            print(f"noise {heatmap:10s} k={k:3d}: {rows[-1][2]} pairs | median drop {rows[-1][3]:.3f} nats | "
                  f"> 1 nat {rows[-1][4]:.0%} | answer changed {rows[-1][5]:.0%}", flush=True)
    return [f"The visual tool (lesion classifier trained on the SFT split) on the val split: AUROC {seen['any']:.3f} for "
            f"any finding; " + ", ".join(f"{k} {v:.3f}" for k, v in seen.items() if k != "any"), "",
            "| heatmap | k | pairs | median log P(y_w ; x) - log P(y_w ; x*) | share > 1 nat | greedy answer changed |",
            "|---|---|---|---|---|---|"] + [f"| {h} | {k} | {n} | {m:.3f} | {s:.0%} | {c:.0%} |" for h, k, n, m, s, c in rows]


def in_workers(groups, jobs, out, argv, command=()):
    """Run groups of the study (or sweep) in `jobs` processes of one thread each: this file with argv less
    the flags each group sets, plus the group's own flags and --runs-only, at most `jobs` at a time; each
    writes OUT/jobs/LABEL.log. groups: [(label, flags)]. A failed group ends the command after the others
    finish, naming its log."""
    os.makedirs(os.path.join(out, "jobs"), exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    strip = {"--bases", "--seeds", "--rows", "--jobs"}
    rest = [a for i, a in enumerate(argv) if a not in strip and (i == 0 or argv[i - 1] not in strip)]
    todo, running, failed, t0 = list(groups), {}, [], time.time()
    beat = t0
    while todo or running:
        while todo and len(running) < jobs:
            label, flags = todo.pop(0)
            log = os.path.join(out, "jobs", f"{label}.log")
            cmd = [sys.executable, "-m", "lab.study", *command, *rest, *flags, "--runs-only"]
            running[label] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT), log)
        time.sleep(2.0)
        for label, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                del running[label]
                failed += [log] if proc.returncode else []
                print(f"  {label}: {'FAILED, see ' + log if proc.returncode else 'done'} "
                      f"({len(groups) - len(todo) - len(running)}/{len(groups)}, {time.time() - t0:.0f}s)", flush=True)
        if time.time() - beat >= 30:   # never silent for long: the runs the workers have finished so far
            beat = time.time()
            done = sum(line.startswith(("run ", "| ")) for name in os.listdir(os.path.join(out, "jobs"))
                       for line in open(os.path.join(out, "jobs", name), errors="replace"))
            print(f"  {done} runs finished in the workers, {len(running)} groups running, {len(todo)} waiting "
                  f"({time.time() - t0:.0f}s)", flush=True)
    if failed:
        sys.exit(f"lab.study: {len(failed)} group(s) failed: {', '.join(failed)}")


def run_cached(run_dir, argv, base_path, log_path, name):
    """train.main(argv) with its output to log_path, unless run_dir holds the metrics of the same argv
    on the same base weights (by their bytes). returns (metrics, reused)."""
    metrics_path, computed = os.path.join(run_dir, "metrics.json"), []
    key = checkpoint.fingerprint({"argv": argv, "base": weights_digest(base_path)})  # the base's bytes, not its path

    def compute():
        computed.append(argv)
        with open(log_path, "w") as log, contextlib.redirect_stdout(log):
            train.main(argv)
        return checkpoint.read_json(metrics_path), True

    def load():
        return checkpoint.read_json(metrics_path) if os.path.exists(metrics_path) else None
    metrics = checkpoint.cached(os.path.join(run_dir, "study_key.json"), key, compute,
                                lambda m: None, load, lambda *a: None, name)
    return metrics, not computed


def slug(name):
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:48]


def weights_digest(folder):
    """sha256 of a model folder's weight files (their bytes, in name order): what a study row depends on."""
    import hashlib
    h = hashlib.sha256()
    for f in sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin"))):
        h.update(f.encode() + checkpoint.file_digest(os.path.join(folder, f)).encode())
    return h.hexdigest()[:16]


def visual_tool_auroc(classifier, images):
    """How well the visual tool sees: the AUROC of its confidence (largest finding probability) for
    "has any finding" against clear images, and of each finding's probability for that finding."""
    with torch.no_grad():
        p = classifier(torch.as_tensor(np.stack([im["pixels"] for im in images]))[:, None]).sigmoid().numpy()
    y = synthetic.finding_labels(images)
    return {"any": auroc(p.max(1).tolist(), (y.max(1) > 0).tolist()),
            **{k: auroc(p[:, i].tolist(), y[:, i].tolist()) for i, k in enumerate(synthetic.KINDS)}}




if __name__ == "__main__":
    main()
