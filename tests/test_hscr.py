"""HSCR's pair building: visual-token dropout, contrastive decoding with replacement, the levels, and
the objective end to end on the tiny default.  python -m pytest -q tests/test_hscr.py"""
import json
import os

import torch

import data
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_visual_token_dropout_hides_only_image_tokens():
    image = torch.tensor([[False, True, True, True, True, True, True, True, True, True, True, False, False]] * 3)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[2, -1] = 0                                                   # padding stays padding
    out = data.visual_token_dropout(mask, image, 0.7, torch.Generator().manual_seed(0))
    assert torch.equal(out[~image], mask[~image])                     # text and padding untouched
    assert ((out == 0) & image).sum(1).tolist() == [7, 7, 7]          # round(0.7 * 10) per row
    assert not torch.equal(out[0], out[1])                            # each row draws its own positions
    assert torch.equal(data.visual_token_dropout(mask, image, 0.0), mask)


def scripted(full_tokens, blind_tokens, V=6):
    """next_logits for one row: step t's full argmax is full_tokens[t], its image-blind argmax blind_tokens[t]."""
    def next_logits(rows, prefixes):
        t = len(prefixes[0])
        full, dropped = torch.zeros(len(rows), V), torch.zeros(len(rows), V)
        full[:, full_tokens[min(t, len(full_tokens) - 1)]] = 3.0
        dropped[:, blind_tokens[min(t, len(blind_tokens) - 1)]] = 3.0
        return full, dropped
    return next_logits


def test_decoding_replaces_exactly_the_coupled_steps():
    EOS = 0
    fn = scripted([1, 2, 3, EOS], [1, 4, 5, EOS])   # steps 1 and 2 depend on the image, steps 0 and 3 do not
    answers, shifts = data.decode_with_replacement(fn, 1, [set()], 10, EOS)
    assert answers == [[1, 2, 3]] and len(shifts[0]) == 4
    assert shifts[0][0] == 0 and shifts[0][3] == 0 and shifts[0][1] > 1 and shifts[0][2] > 1
    assert data.decode_with_replacement(fn, 1, [{1}], 10, EOS)[0] == [[1, 4, 3]]
    assert data.decode_with_replacement(fn, 1, [{1, 2}], 10, EOS)[0] == [[1, 4, 5]]
    assert data.decode_with_replacement(fn, 1, [{0}], 10, EOS)[0] == [[1, 2, 3]]   # same argmax: no change
    assert data.decode_with_replacement(fn, 1, [set()], 2, EOS)[0] == [[1, 2]]     # the cap


def test_levels_take_the_largest_shifts():
    assert data.hscr_levels([0.1, 2.0, 0.5, 3.0], n=10) == ({3, 1}, {3, 1, 2, 0})
    assert data.hscr_levels([0.1, 2.0, 0.5, 3.0], n=2) == ({3}, {3, 1})
    assert data.hscr_levels([0.4], n=10) == (set(), {0})              # one step: y_l1 is the greedy answer


def test_hscr_runs_end_to_end_and_logs_three_margins(tmp_path):
    args = ["--out", str(tmp_path), "--objective", "hscr", "--n-text", "96", "--n-test", "6", "--batch-size", "4",
            "--epochs", "1", "--hscr-p", "1.0"]
    train.main(args)
    records, _ = data.read_pairs(str(tmp_path / "pairs" / "hscr.jsonl"))
    assert records and all(r["source"] == "hscr" and r["rejected2"] for r in records)
    assert all(r["chosen"] != r["rejected"] and r["chosen"] != r["rejected2"] for r in records)
    log = [json.loads(l) for l in (tmp_path / "hscr" / "log.jsonl").read_text().splitlines()]
    assert {"margin", "margin_w_l2", "margin_l1_l2"} <= set(log[0])
    metrics = json.loads((tmp_path / "hscr" / "metrics.json").read_text())
    assert metrics["objective"] == "hscr" and "before" in metrics and "after" in metrics
