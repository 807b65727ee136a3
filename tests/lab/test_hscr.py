"""HSCR's pair building: visual-token dropout, contrastive decoding with replacement, the levels, and
the objective end to end on the tiny default.  python -m pytest -q tests/test_hscr.py"""
import json
import math
import os

import torch

import data
from lab import hscr
from world.rule_judge import polarity
import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_visual_token_dropout_hides_only_image_tokens():
    image = torch.tensor([[False, True, True, True, True, True, True, True, True, True, True, False, False]] * 3)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[2, -1] = 0                                                   # padding stays padding
    out = hscr.visual_token_dropout(mask, image, 0.7, torch.Generator().manual_seed(0))
    assert torch.equal(out[~image], mask[~image])                     # text and padding untouched
    assert ((out == 0) & image).sum(1).tolist() == [7, 7, 7]          # round(0.7 * 10) per row
    assert not torch.equal(out[0], out[1])                            # each row draws its own positions
    assert torch.equal(hscr.visual_token_dropout(mask, image, 0.0), mask)


def scripted(full_next, blind_next, V=8):
    """next_logits for one row: the full-image argmax after a prefix is full_next[prefix], the image-blind
    argmax blind_next[prefix] (prefix a tuple of token ids)."""
    def next_logits(rows, prefixes):
        full, dropped = torch.zeros(len(rows), V), torch.zeros(len(rows), V)
        for j, prefix in enumerate(prefixes):
            full[j, full_next[tuple(prefix)]] = 3.0
            dropped[j, blind_next[tuple(prefix)]] = 3.0
        return full, dropped
    return next_logits


EOS = 0
# steps 1 and 2 depend on the image (the blind argmax differs), steps 0 and 3 do not; after the blind
# token 4 the model goes on differently (6, or 7 without the image): re-scoring must follow that path
FULL = {(): 1, (1,): 2, (1, 2): 3, (1, 2, 3): EOS, (1, 4): 6, (1, 4, 6): EOS, (1, 4, 7): EOS, (1, 2, 5): EOS}
BLIND = {(): 1, (1,): 4, (1, 2): 5, (1, 2, 3): EOS, (1, 4): 7, (1, 4, 6): EOS, (1, 4, 7): EOS, (1, 2, 5): EOS}


def test_greedy_decoding_scores_every_step():
    fn = scripted(FULL, BLIND)
    answers, rewards, replaced = hscr.decode_levels(fn, 1, [0], [math.inf], 10, EOS)
    assert answers == [[1, 2, 3]] and replaced == [0] and len(rewards[0]) == 4
    assert rewards[0][0] == 0 and rewards[0][3] == 0 and rewards[0][1] > 1 and rewards[0][2] > 1
    assert hscr.decode_levels(fn, 1, [0], [math.inf], 2, EOS)[0] == [[1, 2]]          # the cap


def test_replacement_follows_the_new_trajectory_within_the_budget():
    fn = scripted(FULL, BLIND)
    _, rewards, _ = hscr.decode_levels(fn, 1, [0], [math.inf], 10, EOS)
    r = rewards[0][1]
    assert hscr.decode_levels(fn, 1, [1], [r], 10, EOS)[0] == [[1, 4, 6]]        # one step: the rest greedy
    # two steps: the second is chosen on the text as it now stands ((1, 4) -> blind 7), not by the old index
    # (which would have emitted 5, the blind token after (1, 2))
    answers, _, replaced = hscr.decode_levels(fn, 1, [2], [r], 10, EOS)
    assert answers == [[1, 4, 7]] and replaced == [2]
    # a step whose blind argmax equals the greedy token is never counted as replaced
    assert hscr.decode_levels(fn, 1, [5], [0.0], 10, EOS)[2] == [2]
    assert hscr.decode_levels(fn, 1, [5], [r + 1], 10, EOS)[0] == [[1, 2, 3]]      # below the threshold: greedy


def test_level_plan_budget_and_threshold():
    assert hscr.level_plan([0.1, 2.0, 0.5, 3.0], 0.5) == (2, 2.0)
    assert hscr.level_plan([0.1, 2.0, 0.5, 3.0], 0.25) == (1, 3.0)
    assert hscr.level_plan([0.4, 0.2], 0.34) == (1, 0.4)                      # yes + EOS: one step


def test_hscr_runs_end_to_end_and_logs_three_margins(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--objective", "hscr", "--n-text", "96", "--n-test", "6", "--batch-size", "4",
            "--epochs", "1"]
    train.main(args)
    printed = capsys.readouterr().out
    assert "levels equal (y_l1 = y_l2) in" in printed and "steps replaced:" in printed
    records, _ = data.read_pairs(str(tmp_path / "pairs" / "hscr.jsonl"))
    assert records and all(r["source"] == "hscr" and r["rejected2"] for r in records)
    assert any(r["rejected"] != r["rejected2"] for r in records)           # two levels that differ somewhere
    assert not any(polarity(r["chosen"]) for r in records)                 # no bare yes/no: its levels cannot differ
    log = [json.loads(l) for l in (tmp_path / "hscr" / "log.jsonl").read_text().splitlines()]
    assert {"margin", "margin_w_l2", "margin_l1_l2"} <= set(log[0])
    metrics = json.loads((tmp_path / "hscr" / "metrics.json").read_text())
    assert metrics["objective"] == "hscr" and "before" in metrics and "after" in metrics
