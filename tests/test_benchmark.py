"""The synthetic benchmark: priors skewed in the SFT split and broken in the others by construction, the
hallucination and report-finding metrics against hand-counted examples, the judge's graded severity,
and the study's statistics.  python -m pytest -q tests/test_benchmark.py"""
import json
import math

import pytest

import bench
import rule_judge
import score
import synthetic
from eval import answer_prior, hallucination_metrics, report_finding_metrics, report_findings


def yes_rate(qa):
    presence = [q for q in qa if q["qtype"] == "presence"]
    return sum(q["answer"] == "yes" for q in presence) / len(presence)


def test_the_sft_split_teaches_a_prior_that_the_other_splits_break():
    _, train = synthetic.make_synthetic(2000, 0, 32, "train")
    _, pref = synthetic.make_synthetic(600, 0, 32, "pref")
    _, test = synthetic.make_synthetic(600, 0, 32, "test")
    assert abs(yes_rate(train) - 0.3) < 0.06                   # SFT: "Is there a X?" is usually "no"
    assert abs(yes_rate(pref) - 0.5) < 0.06 and abs(yes_rate(test) - 0.5) < 0.06
    prior = answer_prior(train)
    presence = [q for q in test if q["qtype"] == "presence"]
    assert all(prior(q) == "no" and prior.share(q) >= 0.64 for q in presence)   # counted as strong priors
    assert all(prior.share(q) < 0.64 for q in test if q["qtype"] != "presence" and q["type"] != "report")
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


def test_rows_in_any_order_are_labelled_by_their_own_results(tmp_path, monkeypatch):
    """--rows 2,0 must put each row's own metrics under its own name: a run's folder is named for its row."""
    def fake_run(out, base, base_path, seed, name, flags, steps, log_path):
        row = [n for n, _ in bench.STUDY_ROWS].index(name)
        assert slug_ok(log_path, name)
        g = {"pope": {"accuracy": row / 10, "yes_ratio": 0.5}, "counterfactual": {"accuracy": row / 20}, "auroc": 0.5}
        m = {"grounding": g, "prior_breaking": {"hallucination_rate": 0.5, "accuracy_following": 0.5}, "closed": 0.5,
             "open": 0.5, "bleu_mean": 0.5, "report_findings": {"chair": 0.5}}
        return {"before": {**m, "grounding": {**g, "pope": {"accuracy": 0.123, "yes_ratio": 0.5}}}, "after": m}, False
    slug_ok = lambda path, name: bench.slug(name) in path
    monkeypatch.setattr(bench, "run_study_row", fake_run)
    monkeypatch.setattr(bench, "study_bases", lambda out, bases, log=print: {b: "base" for b in bases})
    monkeypatch.setattr(bench, "study_chart", lambda *a: None)
    bench.study_main(["--out", str(tmp_path), "--bases", "0", "--seeds", "0,1", "--rows", "2,0"])
    table = (tmp_path / "study.md").read_text()
    row = lambda name: next(l for l in table.splitlines() if l.startswith(f"| {name} |"))
    assert row("MMedPO (text + visual)").split("|")[2].strip() == "0.200 ± 0.000"
    assert row("SFT on the chosen answers (control)").split("|")[2].strip() == "0.000 ± 0.000"
    assert row("base (before training)").split("|")[2].strip() == "0.123 ± 0.000"
    saved = json.loads((tmp_path / "study.json").read_text())
    assert {(r["row"], r["seed"], r["bal-acc"]) for r in saved} == {
        ("MMedPO (text + visual)", 0, 0.2), ("MMedPO (text + visual)", 1, 0.2),
        ("SFT on the chosen answers (control)", 0, 0.0), ("SFT on the chosen answers (control)", 1, 0.0)}
