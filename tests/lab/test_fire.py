"""FiRe-MPO's pair building: the rule editor, the token masks, the records, and the objective end to end
on the tiny default (the loss math is in tests/lab/test_lab_losses.py).  python -m pytest -q tests/lab/test_fire.py"""
import json

import pytest
import torch

import data
from lab import fire
from world import rule_judge
import score
import train


@pytest.mark.parametrize("question, truth, answer, edited", [
    ("Where is the nodule?", "right middle", "left middle", "right middle"),                      # side
    ("What abnormality is seen in the lungs?", "consolidation and mass", "consolidation and nodule",
     "consolidation and mass"),                                                                  # finding
    ("Where is the mass?", "right upper", "left lower", "right upper"),                          # two slots
    ("Is there a mass?", "Yes", "no", "yes"),                                                    # yes/no, answer's case
    ("What modality is this?", "MRI", "This is a CT scan.", "This is a MRI scan."),              # words kept
])
def test_rule_editor_swaps_only_the_wrong_slot(question, truth, answer, edited):
    text, how = rule_judge.rule_edit(question, truth, answer)
    assert text == edited and how != "right"


@pytest.mark.parametrize("question, truth, answer", [
    ("Is there a mass?", "yes", "Yes, there is."), ("Where is the mass?", "right upper", "right upper zone"),
    ("Is the heart enlarged?", "no", "No"), ("What abnormality is seen?", "no abnormality", "no abnormality")])
def test_rule_editor_never_changes_a_right_answer(question, truth, answer):
    assert rule_judge.rule_edit(question, truth, answer) == (None, "right")
    assert score.edit_answer(rule_judge.RuleJudge(), question, truth, answer)[0] is None


def test_an_answer_with_nothing_to_swap_becomes_the_truth_and_says_so():
    assert rule_judge.rule_edit("What abnormality?", "no abnormality", "nodule") == ("no abnormality", "rewritten: no slot to swap")
    assert rule_judge.rule_edit("Is the heart enlarged?", "no", "Yes, it is enlarged.")[0] == "no"  # never "No, it is enlarged."


def test_an_llm_editor_that_leaks_falls_back_to_the_rule_editor():
    class Leaky:
        name, model = "leaky", "m"

        def __call__(self, messages):
            return "Question: Where is the nodule?\nOriginal Answer: right middle"
    text, how = score.edit_answer(Leaky(), "Where is the nodule?", "right middle", "left middle")
    assert text == "right middle" and "rule editor" in how and rule_judge.clean_answer(text) == text


def test_edit_masks_from_the_diff():
    assert fire.edit_masks(["right", "lung", "nodule"], ["left", "lung", "nodule"]) == ([1, 0, 0], [1, 0, 0])
    # an insertion marks y_w only, a deletion y_l only
    assert fire.edit_masks(["no", "large", "mass"], ["no", "mass"]) == ([0, 1, 0], [0, 0])
    assert fire.edit_masks(["mass"], ["large", "mass"]) == ([0], [1, 0])
    assert fire.edit_masks(["a", "b"], ["a", "b"]) == ([0, 0], [0, 0])


def test_fire_runs_end_to_end_with_masked_records_and_two_rounds(tmp_path):
    train.main(["--out", str(tmp_path), "--objective", "fire", "--n-text", "96", "--n-test", "6", "--batch-size", "4",
                "--epochs", "1", "--policy-rounds", "2"])
    records, _ = data.read_pairs(str(tmp_path / "pairs" / "fire.jsonl"))
    assert records and all(r["source"] == "fire" and r["chosen"] != r["rejected"] for r in records)
    assert all(any(r["edit_masks"][0]) or any(r["edit_masks"][1]) for r in records)    # an edit is never empty
    second, _ = data.read_pairs(str(tmp_path / "fire" / "fire_round1.jsonl"))     # round 2: the adapter's answers
    assert second and all("round 1" in r["provenance"] for r in second)
    assert all(r["edit"] in ("minimal", "rewritten") and r["direction"] in ("yes->no", "no->yes", "open")
               for r in records + second)
    logs = [json.loads(l) for name in ("log_round0.jsonl", "log_round1.jsonl")
            for l in (tmp_path / "fire" / name).read_text().splitlines()]
    assert logs and {"l_tok", "l_vis", "l_kl", "margin_vis", "kl_share"} <= set(logs[0])
    assert logs[0]["l_kl"] == 0 and logs[-1]["l_kl"] > 0     # the policy starts at the reference, then leaves it
    # the reference stays the base model in every round: round 2's cached log-probs are the base's own
    from transformers import AutoModelForImageTextToText, AutoProcessor
    base = train.os.path.join(train.os.path.dirname(train.__file__), "assets", "tiny-base")
    model, processor = AutoModelForImageTextToText.from_pretrained(base).eval(), AutoProcessor.from_pretrained(base)
    ref = torch.load(tmp_path / "fire" / "ref_logps_round1.pt", weights_only=True)["logps"]
    dataset = data.RecordDataset(second[:4], processor, data.model_image_reader(False))
    with torch.no_grad():
        own = data.response_logps(model, data.collate_records([dataset[i] for i in range(4)], processor.tokenizer.pad_token_id), 4)[1].sum(-1)
    assert torch.allclose(ref[:4], own, atol=1e-4)
    for r in records + second:   # each row's mask over its own response's tokens: y_w's, y_l's, then both again
        m_w, m_l, m_cw, m_cl = r["edit_masks"]
        assert (m_w, m_l) == fire.edit_masks(data.response_ids(processor.tokenizer, r["chosen"]),
                                            data.response_ids(processor.tokenizer, r["rejected"]))
        assert (m_cw, m_cl) == (m_w, m_l)
    metrics = json.loads((tmp_path / "fire" / "metrics.json").read_text())
    assert metrics["objective"] == "fire" and "before" in metrics and "after" in metrics


def test_edit_mask_lands_on_the_edited_label_positions(tmp_path):
    from transformers import AutoProcessor
    import numpy as np
    from PIL import Image
    processor = AutoProcessor.from_pretrained(train.os.path.join(train.os.path.dirname(train.__file__), "assets", "tiny-base"))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
    y_w, y_l = "right upper", "left upper"
    m_w, m_l = fire.edit_masks(data.response_ids(processor.tokenizer, y_w), data.response_ids(processor.tokenizer, y_l))
    rec = {"image": str(tmp_path / "a.png"), "corrupted_image": str(tmp_path / "a.png"), "prompt": "Where is the mass?",
           "chosen": y_w, "rejected": y_l, "edit_masks": [m_w, m_l, m_w, m_l]}
    rows = data.RecordDataset([rec], processor, data.model_image_reader(False))[0]
    assert len(rows) == 4
    for row, mask in zip(rows, (m_w, m_l, m_w, m_l)):
        response = row["labels"] != data.IGNORE_INDEX
        assert row["edit_mask"][~response].sum() == 0                         # never on the prompt or padding
        assert row["edit_mask"][response].tolist()[:len(mask)] == mask        # on the response, in order
        edited_ids = row["labels"][row["edit_mask"] > 0].tolist()
        assert processor.tokenizer.decode(edited_ids).strip() in ("right", "left")


@pytest.mark.parametrize("answer, edited, truth, kind", [
    ("left upper", "right upper", "right upper", "minimal"),                                    # one wrong word
    ("consolidation and nodule", "pleural effusion", "pleural effusion", "minimal"),            # nothing right to keep
    ("The heart size is normal. The lungs are clear.", "The heart size is normal. There is a mass in the left upper zone.",
     "The heart size is normal. There is a mass in the left upper zone.", "minimal"),           # one sentence
    ("there is a mass in the left upper zone", "right upper", "right upper", "rewritten"),      # right words dropped
    ("left upper", "right upper and a mass", "right upper", "rewritten"),                       # a word the truth lacks
    ("there is a mass in the left upper zone", "NaN", "right upper", "rewritten"),
])
def test_an_edit_is_minimal_when_it_changes_only_what_is_wrong(answer, edited, truth, kind):
    assert rule_judge.edit_kind(answer, edited, truth) == kind
