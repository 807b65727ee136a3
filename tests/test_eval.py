"""Metrics pinned on hand-worked examples.  python -m pytest -q tests/test_eval.py"""
import math

import pytest

from eval import answer_prior, bleu, closed_correct, normalize, open_recall, rouge_l, vqa_metrics


def test_normalize():
    assert normalize("The Heart, is ENLARGED!") == ["heart", "is", "enlarged"]
    assert normalize("Two nodules; an effusion") == ["2", "nodules", "effusion"]


def test_open_recall_and_closed():
    assert open_recall("the nodule is in the right lower zone", "right upper zone") == pytest.approx(2 / 3)
    assert open_recall("two lesions", "2") == 1.0
    assert open_recall("", "mass") == 0.0
    assert closed_correct("Yes, there is.", "yes") == 1.0
    assert closed_correct("no", "Yes") == 0.0
    assert closed_correct("yesterday", "yes") == 0.0  # a whole word, not a substring


def test_bleu_hand_values():
    # normalized: pred [cat sat on mat], ref [cat is on mat]; p1 = 3/4, p2 = 1/3, no 3-gram match, BP = 1
    b = bleu(["the cat sat on the mat"], ["the cat is on the mat"])
    assert b[0] == pytest.approx(0.75, abs=1e-6)
    assert b[1] == pytest.approx(math.sqrt(0.75 / 3), abs=1e-6)
    assert b[2] < 1e-4 and b[3] < 1e-4
    # a short candidate: c = 3, r = 4, BP = exp(1 - 4/3); all unigrams match
    assert bleu(["cat on mat"], ["cat is on the mat"])[0] == pytest.approx(math.exp(-1 / 3), abs=1e-6)
    # corpus level: counts are summed before dividing
    assert bleu(["cat on mat", "dog"], ["cat on mat", "bird"])[0] == pytest.approx(3 / 4, abs=1e-6)
    # several references: clipped by the best, length of the closest
    assert bleu(["cat on mat"], [["dog is here now", "cat on mat"]])[0] == pytest.approx(1.0, abs=1e-6)


def test_rouge_l_hand_values():
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(0.75, abs=1e-6)
    # LCS 3, P = 1, R = 3/4: F = (1 + 1.44) P R / (R + 1.44 P) = 1.83 / 2.19
    assert rouge_l(["cat on mat"], ["cat is on the mat"]) == pytest.approx(1.83 / 2.19, abs=1e-6)
    assert rouge_l(["dog"], ["cat"]) == 0.0
    assert rouge_l(["cat on mat", "dog"], ["cat on mat", "cat"]) == pytest.approx(0.5)


def test_vqa_metrics_and_prior():
    items = [{"question": "Is there a mass?", "answer": "yes", "type": "closed", "qtype": "presence"},
             {"question": "Is there a mass?", "answer": "no", "type": "closed", "qtype": "presence"},
             {"question": "Where is the mass?", "answer": "left upper", "type": "open", "qtype": "where"}]
    m = vqa_metrics(items, ["yes", "yes", "left lower"])
    assert m["closed"] == 0.5 and m["open"] == 0.5 and m["per_qtype"] == {"presence": 0.5, "where": 0.5}
    prior = answer_prior(items + [items[0]])
    assert prior(items[1]) == "yes" and prior(items[2]) == "left upper"
    assert prior({"question": "never seen?", "answer": "", "type": "closed"}) == "yes"
