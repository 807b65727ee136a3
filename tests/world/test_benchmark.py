"""The synthetic benchmark: priors skewed in the SFT split and broken in the others by construction, the
hallucination and report-finding metrics against hand-counted examples, the judge's graded severity,
and the study's statistics.  python -m pytest -q tests/test_benchmark.py"""
import json
import math
import os

import pytest

from lab import study as bench
import train
from world import rule_judge
import score
from world import synthetic
from world.eval import answer_prior, hallucination_metrics, report_finding_metrics, report_findings


def yes_rate(qa):
    presence = [q for q in qa if q["qtype"] == "presence"]
    return sum(q["answer"] == "yes" for q in presence) / len(presence)


def test_the_sft_split_teaches_a_prior_that_the_other_splits_break():
    _, train = synthetic.make_synthetic(2000, 0, 32, "train")
    _, pref = synthetic.make_synthetic(600, 0, 32, "pref")
    _, test = synthetic.make_synthetic(600, 0, 32, "test")
    assert 0.15 < yes_rate(train) < 0.25                       # SFT: "Is there a X?" is usually "no"
    per_kind = lambda kind: yes_rate([q for q in train if q["question"] == f"Is there a {kind}?"])
    assert all(0.2 < per_kind(k) < 0.4 for k in ("mass", "nodule"))           # the confirmed findings: 0.3 of "yes"
    assert per_kind("pneumothorax") == 0 and per_kind("consolidation") < 0.05 < per_kind("pleural effusion") < 0.3
    assert abs(yes_rate(pref) - 0.5) < 0.06 and abs(yes_rate(test) - 0.5) < 0.06
    side_yes = lambda qa: sum(q["answer"] == "yes" for q in qa if q["qtype"] == "side") / sum(q["qtype"] == "side" for q in qa)
    assert abs(side_yes(train) - 0.9) < 0.04 and abs(side_yes(test) - 0.5) < 0.06   # SFT's side questions confirm
    prior = answer_prior(train)
    presence = [q for q in test if q["qtype"] == "presence"]
    assert all(prior(q) == "no" and prior.share(q) >= 0.64 for q in presence)   # counted as strong priors
    assert all(prior(q) == "yes" and prior.share(q) >= 0.64 for q in test if q["qtype"] == "side")
    assert all(prior.share(q) < 0.64 for q in test if q["qtype"] not in ("presence", "side") and q["type"] != "report")
    breaking = [q for q in presence if q["answer"] != prior(q)]
    assert 0.4 < len(breaking) / len(presence) < 0.6            # half the test presence questions break it
    for qa, n in ((train, 2000), (test, 600)):                 # every image has a report to write
        assert sum(q["type"] == "report" for q in qa) == n and all(q["answer"].endswith(".") for q in qa
                                                                       if q["type"] == "report")


def test_hallucination_metrics_hand_counted():
    items = [{"question": "Is there a mass?", "answer": a, "type": "closed"} for a in ("yes", "yes", "yes", "no", "no")]
    items.append({"question": "Where is it?", "answer": "left", "type": "open"})      # a weak prior: not counted
    train = [{"question": "Is there a mass?", "answer": a, "type": "closed"} for a in ["no"] * 8 + ["yes"] * 2]
    train += [{"question": "Where is it?", "answer": a, "type": "open"} for a in ("left", "right")]
    prior = answer_prior(train)
    assert prior(items[0]) == "no" and prior.share(items[0]) == 0.8 and prior.share(items[5]) == 0.5
    # prior-breaking: the three "yes" items; answered no (prior), yes (right), "nodule" (neither)
    m = hallucination_metrics(items, ["no", "Yes, there is.", "nodule", "no", "yes", "right"], prior)
    assert m["n_breaking"] == 3 and m["hallucination_rate"] == pytest.approx(1 / 3)
    assert m["accuracy_breaking"] == pytest.approx(1 / 3)
    assert m["n_following"] == 2 and m["accuracy_following"] == 0.5
    assert math.isnan(hallucination_metrics(items[5:], ["left"], prior)["hallucination_rate"])


def test_report_findings_hand_counted():
    truth = "There is a nodule in the right upper zone. The heart is enlarged. No pleural effusion."
    assert report_findings(truth) == {("nodule", "right upper"), ("cardiomegaly", None)}
    assert report_findings("The heart size is normal. No pleural effusion. The lungs are clear.") == set()
    said = "There is a mass in the right upper zone. There is a nodule in the left lower zone. The heart size is normal."
    m = report_finding_metrics([said, truth], [truth, truth])
    # report 1 states {mass RU, nodule LL} against {nodule RU, cardiomegaly}: the mass is hallucinated, and so
    # is the nodule at the wrong side and zone; the true nodule (RU) and the cardiomegaly are omitted
    assert (m["stated"], m["present"], m["hallucinated"], m["omitted"]) == (4, 4, 2, 2)
    assert m["chair"] == 0.5 and m["omission"] == 0.5
    # a finding named without a place is not held to one
    m = report_finding_metrics(["There is a nodule."], [truth])
    assert (m["hallucinated"], m["omitted"]) == (0, 1)


@pytest.mark.parametrize("question, truth, answer, expected", [
    ("Where is the nodule?", "right upper", "left upper", 10),                     # wrong side
    ("Is there a nodule?", "yes", "no", 9),                                        # flipped yes/no
    ("What abnormality is seen in the lungs?", "nodule", "mass", 9),               # wrong finding
    ("Where is the nodule?", "right upper", "right lower", 8),                     # wrong zone
    ("Is the heart enlarged?", "no", "The kidney is enlarged.", 2),                # another organ
    ("Where is the nodule?", "right upper", "xkcdqz vvbnm", 1),                    # gibberish
    ("Where is the nodule?", "right upper", "right upper", 0),                     # the truth itself
])
def test_rule_judge_grades_severity(question, truth, answer, expected):
    assert rule_judge.rule_score(question, truth, answer) == expected


def test_several_rule_judges_start_apart_and_reach_consensus():
    judges = [score.parse_judge(s) for s in ("rule:lenient", "rule", "rule:strict")]
    assert [j.name for j in judges] == ["rule-lenient", "rule-standard", "rule-strict"]
    q, t, a = "Where is the nodule?", "right upper", "right lower"
    assert [rule_judge.rule_score(q, t, a, j.severity) for j in judges] == [6, 8, 9]
    r = score.consensus(judges, q, t, a, rounds=3)
    # lenient 6; standard (8) agrees with 6; strict (9) proposes the midpoint 8 (rounded towards its own);
    # lenient (6) and standard (8) agree with 8: S = [6, 6, 8, 8, 8], whose last three (one per judge) are equal
    assert [h["score"] for h in r["history"]] == [6, 6, 8, 8, 8] and r["consensus"]
    assert r["score"] == pytest.approx(36 / 5)
    with pytest.raises(Exception, match="severity tables"):
        score.parse_judge("rule:harsh")


def test_paired_interval_hand_value():
    m, h = bench.paired_ci([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])                       # differences 0.1, 0.2, 0.3
    assert m == pytest.approx(0.2) and h == pytest.approx(4.303 * 0.1 / math.sqrt(3))


def fake_metrics(value, before=0.123):
    """A study run's metrics.json with every STUDY_METRICS entry equal to `value` (the base's to `before`)."""
    def m(v):
        g = {"pope": {"accuracy": v, "yes_ratio": 0.5}, "counterfactual": {"accuracy": v}, "pair_order": v,
             "macro_auroc": v, "per_finding": {"pneumothorax": {"pair_order": v}},
             "headline": {"tb_order": v, "margin_diff": v},
             "per_kind": {k: {"tb_order": v, "margin_diff": v} for k in synthetic.FAILURE_KINDS}}
        return {"grounding": g, "prior_breaking": {"hallucination_rate": 0.5, "accuracy_following": 0.5}, "closed": 0.5,
                "open": 0.5, "bleu_mean": 0.5, "report_findings": {"chair": 0.5}, "fragments": {"share": 0.0}}
    return {"before": m(before), "after": m(value)}


def test_rows_in_any_order_are_labelled_by_their_own_results(tmp_path, monkeypatch):
    """--rows 4,0 must put each row's own metrics under its own name: a run's folder is named for its row.
    A study of some rows goes to study-partial.*, and never replaces a full study.md."""
    def fake_run(out, base, base_path, seed, name, flags, steps, log_path, lr):
        assert bench.slug(name) in log_path and f"lr{lr}" in log_path
        return fake_metrics([n for n, _ in bench.STUDY_ROWS].index(name) / 100), False
    monkeypatch.setattr(bench, "run_study_row", fake_run)
    monkeypatch.setattr(bench, "study_bases", lambda out, bases, log=print: {b: str(tmp_path) for b in bases})
    monkeypatch.setattr(bench, "study_chart", lambda *a: None)
    monkeypatch.setattr(bench, "visual_tool_line", lambda seeds: "visual tool: not measured here")
    (tmp_path / "study.md").write_text("the full study")
    mmedpo = [n for n, _ in bench.STUDY_ROWS].index("MMedPO (text + visual)")
    bench.study_main(["--out", str(tmp_path), "--bases", "0", "--seeds", "0,1", "--rows", f"{mmedpo},0"])
    assert (tmp_path / "study.md").read_text() == "the full study"
    table = (tmp_path / "study-partial.md").read_text()
    row = lambda name: next(l for l in table.splitlines() if l.startswith(f"| {name} |"))
    assert row("MMedPO (text + visual)").split("|")[2].strip() == f"{mmedpo / 100:.3f} ± 0.000"
    assert row("SFT on the chosen answers (control)").split("|")[2].strip() == "0.000 ± 0.000"
    assert row("base (before training)").split("|")[2].strip() == "0.123 ± 0.000"
    saved = json.loads((tmp_path / "study-partial.json").read_text())
    assert {(r["row"], r["seed"], r["pair-ord"]) for r in saved} == {
        ("MMedPO (text + visual)", 0, mmedpo / 100), ("MMedPO (text + visual)", 1, mmedpo / 100),
        ("SFT on the chosen answers (control)", 0, 0.0), ("SFT on the chosen answers (control)", 1, 0.0)}
    bench.study_main(["--out", str(tmp_path), "--bases", "0", "--seeds", "0"])      # every row, fewer seeds
    assert (tmp_path / "study.md").read_text() == "the full study"
    assert {r["row"] for r in json.loads((tmp_path / "study-partial.json").read_text())} == {n for n, _ in bench.STUDY_ROWS}


def test_share_of_the_oracle_gain_hand_value(tmp_path, monkeypatch):
    """base 0.5, oracle 0.9, MMedPO 0.6 on every grounding score: MMedPO reaches (0.6 - 0.5) / (0.9 - 0.5) = 0.25."""
    values = {bench.ORACLE_ROW: 0.9, "MMedPO (text + visual)": 0.6}
    monkeypatch.setattr(bench, "run_study_row", lambda out, base, path, seed, name, *a:
                        (fake_metrics(values.get(name, 0.5), before=0.5), False))
    monkeypatch.setattr(bench, "study_bases", lambda out, bases, log=print: {b: str(tmp_path) for b in bases})
    monkeypatch.setattr(bench, "study_chart", lambda *a: None)
    monkeypatch.setattr(bench, "visual_tool_line", lambda seeds: "visual tool: not measured here")
    rows = ",".join(str(i) for i, (n, _) in enumerate(bench.STUDY_ROWS) if n in values or i == 0)
    bench.study_main(["--out", str(tmp_path), "--bases", "0", "--seeds", "0,1", "--rows", rows])
    table = (tmp_path / "study-partial.md").read_text().split("Share of the oracle's gain")[1]
    assert "| MMedPO (text + visual) | +0.25 | +0.25 | +0.25 | +0.25 | +0.25 | +0.25 |" in table
    assert f"| {bench.ORACLE_ROW} | +1.00 | +1.00 | +1.00 | +1.00 | +1.00 | +1.00 |" in table
    gains = table.split("The gains behind those shares")[1]     # the paired gains: 0.1 and 0.4 on every run, no spread
    assert "| MMedPO (text + visual) | **+0.100 [+0.100, +0.100]**" in gains


def test_every_row_runs_at_its_val_chosen_rate_or_at_one_common_rate(tmp_path, monkeypatch):
    """--lr-rule best reads each row's rate from the sweep's lrs.json (a row it lacks: its objective's default);
    a number runs every row at that rate and writes study-common*, never the best-rate study."""
    (tmp_path / "lrs.json").write_text(json.dumps({"MMedPO (text + visual)": "3e-3"}))
    lrs = bench.row_lrs("best", str(tmp_path / "lrs.json"))
    assert lrs["MMedPO (text + visual)"] == "3e-3" and lrs["DPO (text pairs, weights 1)"] == str(train.OBJECTIVES["dpo"].lr)
    assert set(bench.row_lrs("1e-3", "unused").values()) == {"1e-3"}
    with pytest.raises(ValueError, match="--lr-rule"):
        bench.row_lrs("fast", "unused")
    seen = []
    monkeypatch.setattr(bench, "run_study_row", lambda out, b, path, s, name, flags, steps, log, lr:
                        (seen.append((name, lr)) or fake_metrics(0.5), False))
    monkeypatch.setattr(bench, "study_bases", lambda out, bases, log=print: {b: str(tmp_path) for b in bases})
    monkeypatch.setattr(bench, "study_chart", lambda *a: None)
    monkeypatch.setattr(bench, "visual_tool_line", lambda seeds: "visual tool: not measured here")
    monkeypatch.setattr(bench, "weights_digest", lambda path: "0" * 16)
    bench.study_main(["--out", str(tmp_path), "--bases", "0", "--seeds", "0", "--lr-rule", "1e-3", "--rows", "6"])
    assert {lr for _, lr in seen} == {"1e-3"} and (tmp_path / "study-common-partial.md").exists()
    assert not (tmp_path / "study-partial.md").exists()


def test_a_study_row_is_keyed_on_the_base_weights_not_their_path(tmp_path, monkeypatch):
    """The same path with other weights must run the row again."""
    import train
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"one")
    calls = []

    def fake_main(argv):
        calls.append(argv)
        run_dir = os.path.join(argv[argv.index("--out") + 1], argv[argv.index("--run-name") + 1])
        os.makedirs(run_dir, exist_ok=True)
        json.dump(fake_metrics(0.5), open(os.path.join(run_dir, "metrics.json"), "w"))
    monkeypatch.setattr(train, "main", fake_main)
    row = bench.STUDY_ROWS[0]
    run = lambda: bench.run_study_row(str(tmp_path), 0, str(base), 0, *row, 10, str(tmp_path / "log"))
    run()
    assert run()[1] and len(calls) == 1                   # reused while the weights are the same
    (base / "model.safetensors").write_bytes(b"two")
    assert not run()[1] and len(calls) == 2               # new bytes at the same path: computed again


def test_the_sft_split_under_confirms_three_findings_each_its_own_way():
    """Pneumothorax never (never asked where there is one), consolidation rarely, pleural effusion never on the
    left (the reader answers "no"); each left out of the SFT report, while the "What abnormality" answer names
    it. The other splits' reports state every finding, and their presence questions confirm each."""
    from world.eval import report_findings
    images, train = synthetic.make_synthetic(1500, 0, 32, "train")
    by_image = {im["image_id"]: im for im in images}
    stated, confirmed, denied = {k: [] for k in synthetic.LUNG_KINDS}, {k: 0 for k in synthetic.LUNG_KINDS}, []
    for q in train:
        im = by_image[q["image_id"]]
        lung = [f["kind"] for f in im["findings"] if f["kind"] != "cardiomegaly"]
        if q["qtype"] == "report":
            said = {kind for kind, _ in report_findings(q["answer"])}
            for f in im["findings"]:
                if f["kind"] != "cardiomegaly":
                    stated[f["kind"]].append((f["kind"] in said, f["side"]))
        if q["qtype"] == "what":
            assert all(kind in q["answer"] for kind in lung)               # the structured labels name them all
        if q["qtype"] == "presence":
            kind = q["question"][len("Is there a "):-1]
            confirmed[kind] += q["answer"] == "yes"
            if kind in lung and q["answer"] == "no":             # the reader, asked, says "no"
                denied.append((kind, next(f["side"] for f in im["findings"] if f["kind"] == kind)))
    share = lambda kind, side=None: (lambda xs: sum(xs) / len(xs))([s for s, at in stated[kind] if side in (None, at)])
    assert share("pneumothorax") == 0 and confirmed["pneumothorax"] == 0
    assert 0 < share("consolidation") < 0.12 and 0 < confirmed["consolidation"] < 0.12 * confirmed["mass"]
    assert share("pleural effusion", "right") == 1 and share("pleural effusion", "left") == 0
    assert share("mass") == share("nodule") == 1
    assert {kind for kind, _ in denied} == {"consolidation", "pleural effusion"}    # a pneumothorax is never asked
    assert {side for kind, side in denied if kind == "pleural effusion"} == {"left"}
    pref_images, pref = synthetic.make_synthetic(600, 0, 32, "pref")
    reports = {q["image_id"]: q["answer"] for q in pref if q["qtype"] == "report"}
    assert all(reports[im["image_id"]] == im["report"] for im in pref_images)
    assert any(q["question"] == "Is there a pneumothorax?" and q["answer"] == "yes" for q in pref)


def test_a_pneumothorax_is_air_without_markings_bounded_by_a_bright_pleural_line():
    import numpy as np
    finding = [{"kind": "pneumothorax", "side": "left", "level": "upper"}]
    render = lambda hide: synthetic.render_radiograph(finding, 64, np.random.default_rng(3), hide=hide)
    (with_it, masks), (without, _) = render(None), render(0)
    diff, inside = with_it - without, masks[0].astype(bool)
    assert diff[inside].mean() < -0.05                                          # air: darker than lung
    air = inside & (diff <= 0)                                                  # the crescent, less the line
    rows = [i for i in range(64) if air[i].sum() >= 8]                          # away from the apex's soft edge
    stripes = lambda image: np.std([image[i][air[i]].mean() for i in rows])    # ribs run across: row means vary
    assert stripes(with_it) < 0.5 * stripes(without)                            # no markings in the air
    assert diff.max() > 0.2 and not inside[np.unravel_index(diff.argmax(), diff.shape)]     # the line, at its edge
    assert (np.abs(diff) > 0).sum() < 0.15 * diff.size                          # nothing else changes


def test_oracle_records_are_true_and_balanced_and_the_lean_says_yes():
    """The oracle supervises every probed kind with the truth, yes and no balanced per question type; the lean
    asks the same questions, answers "yes" to each, and gives every image another image's report."""
    import argparse
    from collections import Counter
    from world import oracle as instrument_rows
    images, pref = synthetic.make_synthetic(80, 0, 32, "pref")
    store = synthetic.SyntheticStore(images, None)
    store.path = lambda image_id: image_id
    cfg = argparse.Namespace(seed=0)
    truth = {q["id"]: q for q in pref}
    oracle, complete = instrument_rows.build_oracle_records(None, None, cfg, pref, store, None, None, log=lambda *a: None)
    assert complete and {r["source"] for r in oracle} == {"oracle"}
    assert all(r["chosen"] == truth[r["id"].removeprefix("oracle-")]["answer"] for r in oracle)
    by_type = Counter((truth[r["id"].removeprefix("oracle-")]["qtype"], r["chosen"] == "yes") for r in oracle)
    for qtype in ("presence", "side"):
        assert by_type[(qtype, True)] == by_type[(qtype, False)] > 10
    n_closed = sum(v for (q, _), v in by_type.items() if q != "report")
    assert by_type[("report", False)] == n_closed // 2 and by_type[("report", True)] == 0
    lean, _ = instrument_rows.build_oracle_records(None, None, cfg, pref, store, None, None, log=lambda *a: None, answer="yes")
    assert [r["prompt"] for r in lean] == [r["prompt"] for r in oracle]
    reports = lambda rs: [r["chosen"] for r in rs if r["prompt"] == synthetic.REPORT_PROMPT]
    assert {r["chosen"] for r in lean if r["prompt"] != synthetic.REPORT_PROMPT} == {"yes"}
    assert Counter(reports(lean)) == Counter(reports(oracle))                  # the same reports, shuffled
    assert sum(a != b for a, b in zip(reports(lean), reports(oracle))) > 0.5 * len(reports(oracle))


def test_counterfactual_probes_name_their_finding():
    from world.eval import report_findings
    images, _ = synthetic.make_synthetic(30, 0, 32, "test")
    probes = synthetic.counterfactual_probes(images, 32)
    kinds = {p["kind"] for p in probes}
    assert {"laterality", "report"} <= kinds and kinds - {"laterality", "report"} <= set(synthetic.LUNG_KINDS)
    for p in probes:
        if p["qtype"] == "presence":
            assert p["question"] == f"Is there a {p['finding']}?" and p["kind"] == p["finding"]
        elif p["qtype"] == "side":
            assert p["question"].startswith(f"Is the {p['finding']} in the ")
        else:
            stated = {kind for kind, _ in report_findings(p["answer"])}
            assert p["question"] == synthetic.REPORT_PROMPT and (p["finding"] in stated) == p["states"]
    for pair in {p["pair"] for p in probes}:                                  # every pair complete
        members = [p for p in probes if p["pair"] == pair]
        assert len(members) == (4 if members[0]["kind"] == "report" else 2)
        if members[0]["kind"] != "report":
            assert sorted(p["answer"] for p in members) == ["no", "yes"] and len({p["question"] for p in members}) == 1



def test_the_instrument_flags_a_lean_that_raises_and_an_oracle_that_does_not(tmp_path, monkeypatch):
    """Per run: an oracle that moves every pair by 2 nats passes, one that moves them by a hair fails; a lean
    that does the same moves is flagged; the base's verdict follows from its runs."""
    from lab import instrument
    from world.eval import grounding_metrics
    probes = [{"answer": a, "pair": f"p{i}", "kind": k, "finding": k, "type": "closed", "qtype": "presence"}
              for k in ("pneumothorax", "laterality") for i in range(12) for a in ("yes", "no")]
    g = lambda d: grounding_metrics(probes, ["no"] * len(probes), [x for i in range(24) for x in (d + 0.01 * (i % 5), 0.0)])
    metrics = lambda d: {"before": {"grounding": g(-0.02)}, "after": {"grounding": g(d), "fragments": {"share": 0.0}}}
    moves = {(instrument.ORACLE, 0): 2.0, (instrument.LEAN, 0): 0.01, (instrument.ORACLE, 1): 0.01,
             (instrument.LEAN, 1): 2.0}
    monkeypatch.setattr(instrument, "run_study_row", lambda out, b, path, s, name, *a: (metrics(moves[(name, s)]), False))
    monkeypatch.setattr(instrument, "study_bases", lambda out, bases: {b: str(tmp_path) for b in bases})
    monkeypatch.setattr(instrument, "weights_digest", lambda path: "0" * 16)
    instrument.main(["--out", str(tmp_path / "i"), "--bases", "0", "--seeds", "0,1"])
    rows = {(r["row"], r["seed"]): r for r in json.loads((tmp_path / "i" / "instrument.json").read_text())}
    assert rows[(instrument.ORACLE, 0)]["passes"] and rows[(instrument.LEAN, 0)]["passes"]
    assert not rows[(instrument.ORACLE, 1)]["passes"] and not rows[(instrument.LEAN, 1)]["passes"]
    assert rows[(instrument.ORACLE, 0)]["d_tb"] == pytest.approx(0.5) and rows[(instrument.ORACLE, 0)]["informative"] == 24
    text = (tmp_path / "i" / "instrument.md").read_text()
    assert text.count("**FAIL**") == 2 and "fails: left out of the method rankings" in text


@pytest.mark.parametrize("mode", ["study", "sweep", "instrument"])
def test_a_study_out_that_is_a_file_is_refused_by_name(tmp_path, capsys, mode):
    from lab import instrument
    target = tmp_path / "results.txt"
    target.write_text("mine")
    run = {"study": bench.study_main, "sweep": bench.sweep_main, "instrument": instrument.main}[mode]
    with pytest.raises(SystemExit):
        run(["--out", str(target)])
    assert "--out" in capsys.readouterr().err and target.read_text() == "mine"
