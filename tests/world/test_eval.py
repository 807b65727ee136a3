"""Metrics pinned on hand-worked examples.  python -m pytest -q tests/test_eval.py"""
import math

import pytest

from world.eval import (answer_prior, bleu, closed_correct, format_table, llava_med_closed, llava_med_open, normalize,
                  open_recall, report_tokens, rouge_l, vqa_metrics)


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


def test_report_tokens_keep_articles_and_drop_punctuation():
    assert report_tokens("The X-ray, it's clear. No effusion!") == ["the", "x-ray", "it's", "clear", "no", "effusion"]


def test_bleu_hand_values():
    # pred [the cat sat on the mat], ref [the cat is on the mat] (articles kept): 1-grams 5/6, 2-grams
    # 3/5 (the cat, on the, the mat), 3-grams 1/4 (on the mat), 4-grams 0/3; equal lengths, BP = 1
    b = bleu(["The cat sat on the mat."], ["the cat is on the mat"])
    assert b[0] == pytest.approx(5 / 6, abs=1e-6)
    assert b[1] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    assert b[2] == pytest.approx(0.5, abs=1e-6)                      # (5/6 * 3/5 * 1/4) ** (1/3)
    assert b[3] < 1e-4
    # punctuation and case do not count: a perfect report scores 1
    assert bleu(["The heart is normal. No effusion."], ["the heart is normal no effusion"]) == pytest.approx([1.0] * 4)
    # a short candidate: c = 3, r = 5 ("the" counts), BP = exp(1 - 5/3); all unigrams match
    assert bleu(["cat on mat"], ["cat is on the mat"])[0] == pytest.approx(math.exp(-2 / 3), abs=1e-6)
    # corpus level: counts are summed before dividing
    assert bleu(["cat on mat", "dog"], ["cat on mat", "bird"])[0] == pytest.approx(3 / 4, abs=1e-6)
    # several references: clipped by the best, length of the closest
    assert bleu(["cat on mat"], [["dog is here now", "cat on mat"]])[0] == pytest.approx(1.0, abs=1e-6)


def test_rouge_l_hand_values():
    # LCS [the cat on the mat] = 5 of 6 either way: F = 5/6
    assert rouge_l(["the cat sat on the mat"], ["The cat is on the mat."]) == pytest.approx(5 / 6, abs=1e-6)
    # LCS 3, P = 1, R = 3/5: F = (1 + 1.44) P R / (R + 1.44 P) = 1.464 / 2.04
    assert rouge_l(["cat on mat"], ["cat is on the mat"]) == pytest.approx(1.464 / 2.04, abs=1e-6)
    assert rouge_l(["dog"], ["cat"]) == 0.0
    assert rouge_l(["cat on mat", "dog"], ["cat on mat", "cat"]) == pytest.approx(0.5)


def test_llava_med_rules_differ_from_ours_on_their_edge_cases():
    # closed: "a nodule" contains "no" as a substring, so LLaVA-Med counts it as answering "no"
    assert llava_med_closed("a nodule", "no") == 1.0 and closed_correct("a nodule", "no") == 0.0
    assert llava_med_closed("a nodule", "yes") == 0.0 and closed_correct("a nodule", "yes") == 0.0
    assert llava_med_closed("there is a mass", "yes") == 0.0          # neither yes nor no: a miss
    assert llava_med_closed("Yes, there is.", "yes") == 1.0 == closed_correct("Yes, there is.", "yes")
    # open: tp counts the prediction's occurrences (2 x right), fn the missing reference word (upper)
    assert llava_med_open("right right lung", "right upper") == pytest.approx(2 / 3)
    assert open_recall("right right lung", "right upper") == pytest.approx(1 / 2)
    assert llava_med_open("", "mass") == 0.0
    items = [{"answer": "no", "type": "closed", "qtype": "presence"},
             {"answer": "right upper", "type": "open", "qtype": "where"}]
    ours, theirs = vqa_metrics(items, ["a nodule", "right right lung"]), \
        vqa_metrics(items, ["a nodule", "right right lung"], scoring="llava-med")
    assert (ours["closed"], ours["open"]) == (0.0, 0.5) and (theirs["closed"], theirs["open"]) == (1.0, pytest.approx(2 / 3))
    assert "VQA scoring: llava-med" in format_table({"m": theirs}) and "VQA scoring: ours" in format_table({"m": ours})
    with pytest.raises(ValueError, match="unknown VQA scoring"):
        vqa_metrics(items, ["", ""], scoring="exact")


def test_vqa_metrics_and_prior():
    items = [{"question": "Is there a mass?", "answer": "yes", "type": "closed", "qtype": "presence"},
             {"question": "Is there a mass?", "answer": "no", "type": "closed", "qtype": "presence"},
             {"question": "Where is the mass?", "answer": "left upper", "type": "open", "qtype": "where"}]
    m = vqa_metrics(items, ["yes", "yes", "left lower"])
    assert m["closed"] == 0.5 and m["open"] == 0.5 and m["per_qtype"] == {"presence": 0.5, "where": 0.5}
    prior = answer_prior(items + [items[0]])
    assert prior(items[1]) == "yes" and prior(items[2]) == "left upper"
    assert prior({"question": "never seen?", "answer": "", "type": "closed"}) == "yes"


def test_pope_reads_answers_as_the_authors_script_does():
    from world.eval import pope_answer
    assert [pope_answer(a) for a in ("Yes.", "No, there is not.", "There is no nodule", "not seen", "Nope",
                                     "Yes. No other finding.", "nodule, no")] == \
        ["yes", "no", "no", "no", "yes", "yes", "no"]


def test_pope_metrics_hand_values_and_a_yes_sayer():
    from world.eval import pope_metrics
    preds, truths = ["yes", "yes", "no", "yes"], ["yes", "no", "no", "yes"]      # tp 2, fp 1, tn 1, fn 0
    m = pope_metrics(preds, truths)
    assert (m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]) == (0.75, 2 / 3, 1.0, 0.75)
    assert m["f1"] == pytest.approx(0.8)
    lean = pope_metrics(["yes"] * 4, ["yes", "no", "yes", "no"])                # "yes" to everything
    assert lean["accuracy"] == 0.5 and lean["recall"] == 1.0 and lean["yes_ratio"] == 1.0


def test_auroc_hand_values():
    from world.eval import auroc
    assert auroc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert auroc([0.1, 0.8, 0.9, 0.2], [1, 1, 0, 0]) == 0.25       # pairs won: (0.8 > 0.2) only, of 4
    assert auroc([0.5, 0.5], [1, 0]) == 0.5                        # a tie counts one half
    assert math.isnan(auroc([0.5], [1]))


def test_counterfactual_accuracy_is_zero_for_an_image_blind_model():
    from world.eval import grounding_metrics
    probes = [{"answer": a, "pair": p} for p in ("p1", "p2") for a in ("yes", "no")]
    blind = grounding_metrics(probes, ["yes", "yes", "no", "no"], [1.0, 1.0, -1.0, -1.0])
    assert blind["counterfactual"] == {"accuracy": 0.0, "n_pairs": 2} and blind["pope"]["accuracy"] == 0.5
    looks = grounding_metrics(probes, ["yes", "no", "yes", "no"], [2.0, -1.0, 1.0, -2.0])
    assert looks["counterfactual"]["accuracy"] == 1.0 and looks["auroc"] == 1.0


def probe_set():
    """Two findings, two counterfactual pairs each: (finding, pair, answer)."""
    return [{"answer": a, "pair": f"{f}{p}", "finding": f} for f in ("mass", "pneumothorax") for p in (1, 2)
            for a in ("yes", "no")]


def test_pair_order_and_per_finding_auroc_hand_values():
    from world.eval import grounding_metrics
    # margins, in probe_set's order: mass pairs (2 vs 1: right), (0 vs 0: a tie); pneumothorax (1 vs 3: wrong), (5 vs 4: right)
    margins = [2.0, 1.0, 0.0, 0.0, 1.0, 3.0, 5.0, 4.0]
    g = grounding_metrics(probe_set(), ["yes"] * 8, margins)
    assert g["pair_order"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert g["per_finding"]["mass"]["pair_order"] == 0.75 and g["per_finding"]["pneumothorax"]["pair_order"] == 0.5
    # mass: present {2, 0} vs absent {1, 0}: 2>1, 2>0, 0<1, 0=0 -> 2.5 of 4; pneumothorax: {1, 5} vs {3, 4}: 5>3, 5>4 -> 2 of 4
    assert g["per_finding"]["mass"]["auroc"] == pytest.approx(0.625) and g["per_finding"]["pneumothorax"]["auroc"] == 0.5
    assert g["macro_auroc"] == pytest.approx((0.625 + 0.5) / 2)


def test_a_lean_cannot_move_the_threshold_free_scores():
    """The same margins shifted towards "yes" (a lean) change every thresholded score and neither
    pair order nor per-finding AUROC; looking (the present image's margin up) changes both."""
    from world.eval import grounding_metrics
    margins = [2.0, 1.0, 0.0, 0.5, 1.0, 3.0, 5.0, 4.0]
    answers = lambda ms: ["yes" if m > 1.5 else "no" for m in ms]
    before = grounding_metrics(probe_set(), answers(margins), margins)
    leaned = [m + 3 for m in margins]
    lean = grounding_metrics(probe_set(), answers(leaned), leaned)
    assert lean["pope"]["yes_ratio"] == 1.0 != before["pope"]["yes_ratio"]
    assert (lean["pair_order"], lean["macro_auroc"]) == (before["pair_order"], before["macro_auroc"])
    looked = [m + 3 * (i % 2 == 0) for i, m in enumerate(margins)]   # every present image's margin up
    look = grounding_metrics(probe_set(), answers(looked), looked)
    assert look["pair_order"] == 1.0 > before["pair_order"] and look["macro_auroc"] > before["macro_auroc"]


def test_fragments_are_answers_with_words_no_training_answer_has():
    from world.eval import answer_prior, fragment_metrics
    prior = answer_prior([{"question": "q", "answer": "There is a mass.", "type": "open"},
                          {"question": "q", "answer": "no", "type": "closed"}])
    assert prior.vocabulary == {"there", "is", "mass", "no"}           # normalized: the article dropped
    f = fragment_metrics(["no", "There is a mass", "eumothora", "", "mass mass no", "m"], prior.vocabulary)
    assert (f["n_fragments"], f["n"]) == (3, 6) and f["share"] == 0.5 and f["examples"] == ["", "eumothora", "m"]


def test_tie_banded_order_and_mean_difference_hand_values():
    """d = 0.05, -0.05, 0.2, -0.3 and exactly 0.1 (the band's edge counts as a tie): credits 1/2, 1/2, 1, 0, 1/2."""
    from world.eval import TIE_BAND, pair_stats, t975
    assert TIE_BAND == 0.1
    s = pair_stats([0.05, -0.05, 0.2, -0.3, 0.1])
    assert s["tb_order"] == pytest.approx(2.5 / 5) and s["n_ties"] == 3 and s["n_pairs"] == 5
    assert s["margin_diff"] == pytest.approx(0.0)
    sd = math.sqrt((0.05 ** 2 + 0.05 ** 2 + 0.2 ** 2 + 0.3 ** 2 + 0.1 ** 2) / 4)
    assert s["margin_ci"] == pytest.approx(2.776 * sd / math.sqrt(5), abs=1e-3)     # t(0.975, 4) = 2.776
    for df, table in ((3, 3.182), (4, 2.776), (10, 2.228), (30, 2.042), (31, 2.040), (40, 2.021), (100, 1.984)):
        assert t975(df) == pytest.approx(table, abs=2e-3)
    assert pair_stats([0.5, 0.6], band=1.0)["tb_order"] == 0.5 and pair_stats([0.5, 0.6], band=0.4)["tb_order"] == 1.0


def test_ties_cannot_move_the_headline_while_pair_order_flips():
    """Ten pairs, each a hair below zero, then each a hair above: pair order goes 0 -> 1, the tie-banded order
    and the mean difference barely move; the paired check does not call it a rise."""
    from world.eval import grounding_metrics, paired_change
    probes = [{"answer": a, "pair": f"p{i}", "finding": "pneumothorax", "kind": "pneumothorax", "type": "closed",
               "qtype": "presence"} for i in range(10) for a in ("yes", "no")]
    scores = lambda d: [x for i in range(10) for x in (d + 0.001 * i, 0.0)]
    before, after = (grounding_metrics(probes, ["no"] * 20, scores(d)) for d in (-0.02, 0.02))
    assert (before["pair_order"], after["pair_order"]) == (0.0, 1.0)
    assert before["headline"]["tb_order"] == after["headline"]["tb_order"] == 0.5
    assert abs(after["headline"]["margin_diff"] - before["headline"]["margin_diff"]) < 0.05
    change = paired_change(before, after)
    assert change["d_tb"] == 0 and not change["raises"]
    looked = grounding_metrics(probes, ["no"] * 20, scores(2.0))                  # a real effect: 2 nats a pair
    change = paired_change(before, looked)
    assert change["d_tb"] == 0.5 and change["raises"] and change["d_nats"] == pytest.approx(2.02)


def test_report_difference_is_the_interaction_of_image_and_report():
    """d = [s(with, states) - s(with, omits)] - [s(without, states) - s(without, omits)]: a model that likes the
    stating report more on every image (a text offset) or every report more on one image (an image offset)
    scores 0; one that prefers the stating report only where the finding is scores the difference."""
    from world.eval import pair_differences
    probe = lambda present, states: {"type": "report", "pair": "rep-1", "kind": "report", "present": present,
                                     "states": states}
    probes = [probe(p, s) for p in (True, False) for s in (True, False)]          # (with, states), (with, omits), ...
    assert pair_differences(probes, [-10.0, -12.0, -11.0, -13.0])["report"]["rep-1"] == pytest.approx(0.0)
    assert pair_differences(probes, [-10.0, -12.0, -14.0, -11.0])["report"]["rep-1"] == pytest.approx(2.0 + 3.0)
    assert pair_differences(probes[:3], [-10.0, -12.0, -14.0]) == {}             # an incomplete pair is left out
