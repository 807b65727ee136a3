"""The instrument's own study, run before any method is ranked on it: does the headline move when it should
and stay when it should not, on every base model and seed?

    oracle  SFT on the TRUE answers of the preference split, for every probed kind (presence and side
            questions, yes and no balanced, and the true reports): a row that must RAISE the headline
    lean    the same questions answered "yes" whatever the image, and each image given another image's
            report: a row that must NOT raise it

A run passes when its oracle raises the tie-banded headline (world.eval.paired_change: the mean change of
each counterfactual pair's credit, its 95 % interval over pairs above 0) and its lean does not (that
interval not above 0). The rule for the method study, fixed before any method row is read: a base on
which either check fails on any seed is reported as failed and left out of the method rankings.

    python -m lab.instrument                            # 3 bases x 4 seeds, 144 steps -> out/instrument/
    python -m lab.instrument --bases 0 --seeds 0        # the default run's base and seed only

Tests:  python -m pytest -q tests/world/test_benchmark.py
"""
import argparse
import os
import time

from guard import checkpoint
from lab.study import STUDY_ROWS, int_list, run_study_row, study_bases, weights_digest
from world import synthetic
from world.eval import TIE_BAND, paired_change

ROWS = [STUDY_ROWS[1], STUDY_ROWS[2]]     # the oracle, the lean
ORACLE, LEAN = ROWS[0][0], ROWS[1][0]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lab.instrument", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/instrument", help="runs go to OUT/baseB/seedS/ROW; reused when unchanged")
    ap.add_argument("--bases", type=int_list, default=[0, 1, 2],
                    help="base models: shipped ones from assets/ (tiny-base, tiny-base-1, tiny-base-2); others built")
    ap.add_argument("--seeds", type=int_list, default=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=144, help="optimizer steps of each row (the study's budget)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out {args.out}: is a file; the study writes a folder of runs")
    os.makedirs(args.out, exist_ok=True)
    bases, results, t0 = study_bases(args.out, args.bases), {}, time.time()
    runs = [(b, s) for b in args.bases for s in args.seeds]
    for i, (b, s) in enumerate(runs):
        for name, flags in ROWS:
            t = time.time()
            log_path = os.path.join(args.out, f"base{b}-seed{s}-{name.split(':')[0]}.log")
            metrics, reused = run_study_row(args.out, b, bases[b], s, name, flags, args.steps, log_path)
            results[(name, b, s)] = check(name, metrics)
            c = results[(name, b, s)]
            print(f"[{i + 1}/{len(runs)}] base {b} seed {s} | {name.split(':')[0]:6s} | tb-order {c['before']:.3f} -> "
                  f"{c['after']:.3f} | Δ {c['d_tb']:+.3f} ± {c['d_tb_ci']:.3f} | Δnats {c['d_nats']:+.2f} | "
                  f"{'pass' if c['passes'] else 'FAIL'} | {'reused' if reused else f'{time.time() - t:.0f}s'}", flush=True)
    text = table(results, args, bases)
    checkpoint.write_json(os.path.join(args.out, "instrument.json"),
                          [{"row": name, "base": b, "seed": s, **c} for (name, b, s), c in results.items()], indent=1)
    checkpoint.atomic_write(os.path.join(args.out, "instrument.md"), lambda f: f.write(text + "\n"))
    print("\n" + text + f"\n\nwritten to {args.out}/instrument.md and instrument.json in {time.time() - t0:.0f}s")


def check(name, metrics):
    """One run of the oracle or the lean, read: the headline before and after, the paired change (macro and
    per kind), the informative pairs (those the base does not already order beyond the band) and the verdict."""
    before, after = metrics["before"]["grounding"], metrics["after"]["grounding"]
    change = paired_change(before, after)
    kinds = before["headline"]["kinds"]
    informative = sum(d <= TIE_BAND for k in kinds for d in before["pair_diffs"].get(k, {}).values())
    return {"before": before["headline"]["tb_order"], "after": after["headline"]["tb_order"],
            "nats_before": before["headline"]["margin_diff"], "nats_after": after["headline"]["margin_diff"],
            "d_tb": change["d_tb"], "d_tb_ci": change["d_tb_ci"], "d_nats": change["d_nats"], "d_nats_ci": change["d_nats_ci"],
            "raises": change["raises"], "passes": change["raises"] if name == ORACLE else not change["raises"],
            "per_kind": {k: {"before": before["per_kind"][k]["tb_order"], "after": after["per_kind"][k]["tb_order"],
                             **change["per_kind"].get(k, {})} for k in kinds if k in before["per_kind"]},
            "controls": (before["controls"]["tb_order"], after["controls"]["tb_order"]),
            "n_pairs": before["headline"]["n_pairs"], "informative": informative,
            "frag": metrics["after"]["fragments"]["share"]}


def table(results, args, bases):
    """Markdown: every run's two rows with their paired changes and verdicts, each kind's tie-banded order
    before -> after, then each base's verdict under the rule."""
    kinds = list(next(iter(results.values()))["per_kind"])
    lines = [f"python -m lab.instrument --bases {','.join(map(str, args.bases))} --seeds "
             f"{','.join(map(str, args.seeds))} --steps {args.steps}", "",
             "\n".join(f"- base {b}: {bases[b]}, weights sha256 {weights_digest(bases[b])}" for b in args.bases), "",
             f"Headline: the tie-banded order (band ±{TIE_BAND} nat) averaged over the failure kinds "
             f"({', '.join(synthetic.FAILURE_KINDS)}); Δ: its paired change over the same counterfactual pairs with "
             f"the 95 % interval over pairs; Δnats: the paired change of the mean difference d. pass: the oracle's "
             f"interval lies above 0, the lean's does not. Informative pairs: those the base does not already "
             f"order beyond the band.", "",
             "| base | seed | row | tb-order before → after | Δ [95 %] | Δnats [95 %] | " +
             " | ".join(kinds) + " | controls | informative / pairs | frag% | check |",
             "|---|---|---|---|---|---|" + "---|" * len(kinds) + "---|---|---|---|"]
    for (name, b, s), c in results.items():
        cells = [f"{c['per_kind'][k]['before']:.2f} → {c['per_kind'][k]['after']:.2f}" if k in c["per_kind"] else "-"
                 for k in kinds]
        lines.append(f"| {b} | {s} | {name.split(':')[0]} | {c['before']:.3f} → {c['after']:.3f} | "
                     f"{c['d_tb']:+.3f} [{c['d_tb'] - c['d_tb_ci']:+.3f}, {c['d_tb'] + c['d_tb_ci']:+.3f}] | "
                     f"{c['d_nats']:+.2f} [{c['d_nats'] - c['d_nats_ci']:+.2f}, {c['d_nats'] + c['d_nats_ci']:+.2f}] | "
                     + " | ".join(cells) + f" | {c['controls'][0]:.2f} → {c['controls'][1]:.2f} | "
                     f"{c['informative']} / {c['n_pairs']} | {100 * c['frag']:.1f} | {'pass' if c['passes'] else '**FAIL**'} |")
    lines += ["", "| base | oracle raises the headline | lean does not | verdict |", "|---|---|---|---|"]
    for b in args.bases:
        o = [results[(ORACLE, b, s)]["passes"] for s in args.seeds]
        l_ = [results[(LEAN, b, s)]["passes"] for s in args.seeds]
        lines.append(f"| {b} | {sum(o)} of {len(o)} seeds | {sum(l_)} of {len(l_)} seeds | "
                     f"{'passes' if all(o) and all(l_) else '**fails: left out of the method rankings**'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
