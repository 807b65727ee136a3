"""Bad inputs and faults get the behaviour a user should get: a clear error naming the flag, file:line
or record, or a recorded, counted skip; and reruns reproduce, no pickle runs, no key is written.
python -m pytest -q tests/test_faults.py"""
import dataclasses
import json
import os

import numpy as np
import pytest
import requests
import torch
from PIL import Image

import data
from world import eval as evaluation
from guard import checkpoint
from world import real_data
import score
import train
from guard import judge as judge_guard
from lab import score_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_BASE = os.path.join(ROOT, "assets", "tiny-base")
SMALL = ["--n-train", "60", "--n-test", "4", "--n-text", "12", "--n-visual", "8", "--batch-size", "4",
         "--epochs", "1", "--lora-dropout", "0.1"]


def adapter(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------
# the same command gives the same result; nothing written runs code; non-finite training stops

def test_run_rerun_and_resume_before_the_first_checkpoint_are_bit_identical(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--out", str(out)] + SMALL
    train.main(args)                                   # every stage computed in this process
    first = adapter(out / "mmedpo")
    train.main(args)                                   # every stage reused
    assert "preference data: reused" in capsys.readouterr().out
    assert same(first, adapter(out / "mmedpo"))
    os.remove(out / "mmedpo" / "checkpoint.pt")        # killed before its first checkpoint
    train.main(args + ["--resume"])
    assert "starting fresh" in capsys.readouterr().out and same(first, adapter(out / "mmedpo"))
    steps = [json.loads(l)["step"] for l in (out / "mmedpo" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))                 # no step logged twice


class Planted:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PLANTED_MARK']}",))


def test_a_planted_pickle_is_refused_and_never_runs(tmp_path, monkeypatch, capsys):
    mark = tmp_path / "code-ran"
    monkeypatch.setenv("PLANTED_MARK", str(mark))
    out = tmp_path / "out"
    (out / "mmedpo").mkdir(parents=True)
    torch.save({"key": Planted()}, out / "mmedpo" / "ref_logps.pt")
    torch.save({"config": Planted()}, out / "mmedpo" / "checkpoint.pt")
    with pytest.raises(SystemExit, match="cannot be read as a checkpoint"):
        train.main(["--out", str(out), "--resume"] + SMALL)
    assert "not a plain tensor file" in capsys.readouterr().out
    assert not mark.exists()


def test_a_non_finite_loss_stops_the_run_naming_step_and_records(tmp_path, monkeypatch):
    def nan_loss(model, batch, ref, weights, args):
        losses, stats = train.preference_loss(model, batch, ref, weights, args)
        return losses * float("nan"), stats
    monkeypatch.setitem(train.OBJECTIVES, "mmedpo", dataclasses.replace(train.OBJECTIVES["mmedpo"], loss=nan_loss))
    with pytest.raises(SystemExit, match=r"step 1: non-finite loss or gradient \(records \['"):
        train.main(["--out", str(tmp_path)] + SMALL)
    assert not (tmp_path / "mmedpo" / "adapter").exists() and not (tmp_path / "mmedpo" / "checkpoint.pt").exists()


@pytest.mark.parametrize("flags, named", [
    (["--beta", "inf"], "--beta"), (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--clip", "-1"], "--clip"),
    (["--rounds", "0"], "--rounds"), (["--lora-dropout", "2"], "--lora-dropout"),
    (["--temperature", "0"], "--temperature"), (["--n-text", "-5"], "--n-text"), (["--image-size", "0"], "--image-size"),
    (["--max-length", "5"], "--max-length"), (["--hscr-p", "1.5"], "--hscr-p"), (["--workers", "0"], "--workers"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--seed", "-1"], "--seed"), (["--lora-alpha", "0"], "--lora-alpha"),
    (["--max-test", "0"], "--max-test"), (["--n-train", "0"], "--n-train"), (["--steps", "0"], "--steps"),
    (["--hscr-p2", "0.5"], "--hscr-p2"), (["--hscr-share", "0"], "--hscr-share"), (["--fire-alpha", "nan"], "--fire-alpha"),
    (["--run-name", "../elsewhere"], "--run-name"), (["--judge", "bogus"], "--judge"),
    (["--selector", "x=ftp://h/v1,model=m"], "--selector"), (["--editor", "x=http://h:/v1,model=m"], "--editor"),
    (["--judge", "x=http://h/v1,model=m,timeout=-1"], "timeout"), (["--judge", "x=http://h/v1,model=m,timeout=inf"], "timeout"),
    (["--judge", "x=http://h/v1,model=m,max_tokens=0"], "max_tokens"), (["--judge", "x=http://h:99999/v1,model=m"], "--judge")])
def test_bad_values_stop_at_start_up_naming_the_flag(flags, named, capsys, monkeypatch):
    monkeypatch.setattr(train, "stage_data", lambda run: pytest.fail("work started before the flags were checked"))
    with pytest.raises(SystemExit):
        train.main(flags)
    assert named in capsys.readouterr().err


def test_unwritable_paths_stop_at_start_up(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for flags, named in [(["--out", str(a_file)], "--out"), (["--export-pairs", str(a_file / "p.jsonl")], "--export-pairs"),
                         (["--out", str(a_file / "sub")], "--out")]:
        with pytest.raises(SystemExit):
            train.main(flags)
        assert named in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            train.main(["--device", "cuda"])
        assert "CUDA is not available" in capsys.readouterr().err


def test_stage_files_unreadable_or_incomplete_are_recomputed(tmp_path):
    key_path, calls = str(tmp_path / "stage.key.json"), []
    (tmp_path / "stage.key.json").write_text('{"key": "ab')            # torn by a kill
    compute = lambda: (calls.append(1), (41, False))[1]
    value = checkpoint.cached(key_path, "k", compute, lambda v: None, lambda: 41, lambda m: calls.append(m), "stage")
    assert value == 41 and any("unreadable" in str(c) for c in calls)
    assert not os.path.exists(key_path)                                 # incomplete: not marked done
    n = calls.count(1)
    checkpoint.cached(key_path, "k", lambda: (42, True), lambda v: None, lambda: 42, lambda m: None, "stage")
    assert os.path.exists(key_path)
    assert checkpoint.cached(key_path, "k", compute, lambda v: None, lambda: 42, lambda m: None, "stage") == 42
    assert calls.count(1) == n                                          # reused, not computed again


# -----------------------------------------------------------------------------
# judges: no bad reply loses finished work

@pytest.mark.parametrize("reply", ['{"score": NaN}', '{"score": Infinity}', '{"score": 1e999}', '{"score": -Infinity}'])
def test_non_finite_scores_are_unreadable_replies(reply):
    assert score.parse_score(reply) == (None, False)


class FakeJudge:
    def __init__(self, behaviour, name="fake"):
        self.name, self.model, self.behaviour, self.calls = name, "m", behaviour, 0

    def __call__(self, messages):
        self.calls += 1
        return self.behaviour(self.calls, messages)


def pairs(n):
    return [{"prompt": f"Is there a mass {i}?", "chosen": "yes", "rejected": "no"} for i in range(n)]


def test_one_pairs_unexpected_failure_costs_only_that_pair(tmp_path):
    def behaviour(call, messages):
        if "mass 3?" in messages[-1]["content"]:
            raise KeyError("something unexpected")
        return '{"score": 7}'
    cache = tmp_path / "cache.jsonl"
    results = score.score_pairs(pairs(6), [FakeJudge(behaviour)], str(cache), workers=3, log=lambda m: None)
    assert [r["status"] for r in results] == ["scored"] * 3 + ["failed"] + ["scored"] * 2
    assert "KeyError" in results[3]["reason"] and len(cache.read_text().splitlines()) == 5


def test_authentication_failure_stops_at_once_and_keeps_finished_scores(tmp_path):
    def behaviour(call, messages):
        if call > 2:
            raise judge_guard.JudgeAuthError("fake: authentication failed, HTTP 401")
        return '{"score": 6}'
    judge, cache = FakeJudge(behaviour), tmp_path / "cache.jsonl"
    with pytest.raises(judge_guard.JudgeAuthError, match="stopped; 2 finished results are kept"):
        score.score_pairs(pairs(40), [judge], str(cache), workers=1, log=lambda m: None)
    assert judge.calls == 3 and len(cache.read_text().splitlines()) == 2      # not asked of every pair


def test_http_reset_mid_body_and_half_written_replies_are_retried(monkeypatch):
    ok = json.dumps({"choices": [{"message": {"content": '{"score": 4}'}}]})
    script = [requests.exceptions.ChunkedEncodingError("reset"), (200, {}, '{"choices": []}'), (200, {}, ok)]

    def post(self, body, headers):   # one POST: (status, headers, text), or what requests raises
        step = script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step
    monkeypatch.setattr(judge_guard.HTTPJudge, "_post", post)
    judge = judge_guard.HTTPJudge("j", "http://127.0.0.1:9/v1", "m", retry=judge_guard.Retry(3, 0.001))
    assert judge([{"role": "user", "content": "x"}]) == '{"score": 4}' and not script


def test_cache_key_follows_the_rounds():
    p, j = pairs(1)[0], [FakeJudge(None)]
    assert score.pair_key(p, j, rounds=0) != score.pair_key(p, j, rounds=5)


def test_score_cli_reads_every_line_and_says_what_it_did(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "Is there a mass?", "chosen": "yes", "rejected": "no"}).encode()
                     + b"\n[1, 2]\n" + json.dumps({"chosen": "yes", "rejected": "no"}).encode() + b"\n\xff\xfe bad\n"
                     + json.dumps({"source": "visual", "prompt": "q?", "chosen": "a", "rejected": "a", "score": 0.9}).encode()
                     + b"\n")
    score_cli.main(["--pairs", str(path), "--out", str(tmp_path / "scored.jsonl")])
    captured = capsys.readouterr()
    out = [json.loads(l) for l in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert len(out) == 2 and out[0]["score_status"] == "scored" and out[1]["source"] == "visual"   # BOM line kept
    for where in (":2: skipped, a JSON list", ":3: skipped, a text pair needs prompt", ":4: skipped, not UTF-8"):
        assert where in captured.err
    assert "1 scored, 0 unscored, 0 failed, 1 passed through" in captured.out
    for bad in (tmp_path / "missing.jsonl", tmp_path):
        with pytest.raises(SystemExit):
            score_cli.main(["--pairs", str(bad), "--out", str(tmp_path / "x.jsonl")])
        assert "--pairs" in capsys.readouterr().err


def test_score_cli_exits_non_zero_when_pairs_failed(tmp_path, monkeypatch):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(pairs(1)[0]) + "\n")
    monkeypatch.setattr(score, "RuleJudge", lambda: FakeJudge(lambda c, m: (_ for _ in ()).throw(score.JudgeError("down"))))
    with pytest.raises(SystemExit, match="1 pairs failed"):
        score_cli.main(["--pairs", str(path), "--out", str(tmp_path / "scored.jsonl")])
    assert json.loads((tmp_path / "scored.jsonl").read_text())["score_status"] == "failed"   # written first


# -----------------------------------------------------------------------------
# inputs read right, or refused with their file, line or record

def test_sixteen_bit_png_keeps_its_range(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    pixels = data.read_image(str(tmp_path / "ramp16.png"))
    assert pixels.max() == 1.0 and pixels.min() == 0.0 and abs(pixels.mean() - 0.5) < 1e-3


def test_a_nan_weight_in_a_pairs_file_is_an_input_error(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    rec = {"id": "p1", "prompt": "q?", "chosen": "yes", "rejected": "no", "image": str(tmp_path / "a.png")}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "weight": float("nan")}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: weight nan is not a finite number"):
        data.read_pairs(str(path), lambda m: None)


@pytest.mark.parametrize("content", [b"", b"[{\"id\": 1,", b"{\"not\": \"a list\"}"])
def test_a_broken_released_file_names_itself(tmp_path, content):
    path = tmp_path / "released.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="released.json"):
        real_data.read_released_pairs(str(path), str(tmp_path))


def test_released_scores_and_paths_are_checked_per_record(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "outside.png")
    conv = lambda v: [{"from": "human", "value": "<image>\nIs there a mass?"}, {"from": "gpt", "value": v}]
    rec = lambda i, score, image="a.png": {"id": i, "image": image, "conversations": conv("Yes"),
                                           "rejected_conversations": conv("No"), "weighted_score": score}
    records = [rec(1, 0.5), rec(2, float("nan")), rec(3, -1e9), rec(4, True), rec(5, 0.5, str(tmp_path / "outside.png"))]
    path = tmp_path / "released.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())               # a BOM is fine
    logs = []
    pairs, skipped = real_data.read_released_pairs(str(path), str(images), logs.append)
    assert [p["score"] for p in pairs] == [0.5, None, None, None] and skipped == 1
    for i in (2, 3, 4):
        assert any(f"id {i})" in l and "not a number in [0, 1]" in l for l in logs)
    assert any("id 5)" in l and "outside --images" in l for l in logs)


def test_a_released_pair_with_nothing_to_prefer_is_skipped_and_named(tmp_path):
    """A chosen answer equal to its rejected one on the same image, or an empty one, is skipped with its own
    reason; the same answer on a noised image (a visual pair) is kept."""
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "n.png")
    conv = lambda v: [{"from": "human", "value": "<image>\nIs there a mass?"}, {"from": "gpt", "value": v}]
    rec = lambda i, c, r, **kw: {"id": i, "image": "a.png", "conversations": conv(c), "rejected_conversations": conv(r),
                                 **kw}
    path = tmp_path / "released.json"
    path.write_text(json.dumps([rec(1, "Yes", "Yes"), rec(2, "", "No"), rec(3, "Yes", "Yes", rejected_image="n.png"),
                                rec(4, "Yes", "No")]))
    logs = []
    pairs, skipped = real_data.read_released_pairs(str(path), str(images), logs.append)
    assert [p["id"] for p in pairs] == ["released-3", "released-4"] and skipped == 2
    assert any("id 1)" in l and "equals the rejected one" in l for l in logs)
    assert any("id 2)" in l and "empty chosen answer" in l for l in logs)
    assert not any("scaffolding in the chosen answer" in l for l in logs)


def test_eval_refuses_bad_flags_before_loading_anything(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for flags, named in [(["--max-items", "0"], "--max-items"), (["--max-items", "-3"], "--max-items"),
                         (["--n-test", "0"], "--n-test"), (["--split", "tset"], "--split"),
                         (["--out", str(tmp_path / "file" / "p.jsonl")], "--out")]:
        with pytest.raises(SystemExit):
            evaluation.main(["--model", TINY_BASE] + flags)
        assert named in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluation.main(["--model", "/nonexistent"])
    assert "--model /nonexistent: no such folder" in capsys.readouterr().err


def test_help_shows_the_flags_most_runs_need_first(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    common = capsys.readouterr().out.split("the flags most runs need (train.py's top):")[1].split("run, model and the tiny base:")[0]
    assert "--lr" in common and "--objective" in common and "--hscr-p" not in common and "--fire-alpha" not in common


def test_each_objective_record_sets_its_flags(tmp_path, capsys):
    """The objective table, not a test of names: dpo's overrides, each objective's default lr (chosen on val),
    and the objectives that build their own records refuse a released file."""
    dpo = train.parse_args(["--out", str(tmp_path), "--objective", "dpo", "--strategies", "text,visual"])
    assert (dpo.strategies, dpo.weighting, dpo.lr) == ("text", "none", train.OBJECTIVES["dpo"].lr)
    assert train.parse_args(["--out", str(tmp_path), "--objective", "sft"]).lr == train.OBJECTIVES["sft"].lr
    assert train.parse_args(["--out", str(tmp_path), "--objective", "sft", "--lr", "5e-4"]).lr == 5e-4
    released = tmp_path / "released.json"
    released.write_text("[]")
    for name in [n for n, o in train.OBJECTIVES.items() if not o.released_pairs]:
        with pytest.raises(SystemExit):
            train.parse_args(["--out", str(tmp_path), "--objective", name, "--pairs", str(released), "--images", str(tmp_path)])
        assert f"--objective {name} builds its own records" in capsys.readouterr().err


def test_a_stage_output_edited_after_its_key_was_written_is_computed_again(tmp_path):
    """The key vouches for the output's bytes: a pairs file reversed by hand, an eval_before.json edited,
    is never reused under the old key."""
    out, calls, said = tmp_path / "stage.json", [], []

    def compute():
        calls.append(1)
        return {"v": 1}, True
    run = lambda: checkpoint.cached(str(out) + ".key.json", "k", compute, lambda v: checkpoint.write_json(str(out), v),
                                    lambda: checkpoint.read_json(str(out)), said.append, "stage", output=str(out))
    assert run() == {"v": 1} and run() == {"v": 1} and len(calls) == 1      # reused while unchanged
    out.write_text('{"v": 2}')
    assert run() == {"v": 1} and len(calls) == 2 and any("not the file its key vouches for" in m for m in said)


def test_weights_are_keyed_by_their_bytes_not_their_size_and_time(tmp_path):
    """Another base's weights with the same name, size and modification time never reuse a stage."""
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, byte in ((a, b"\x01"), (b, b"\x02")):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(byte * 64)
        os.utime(folder / "model.safetensors", ns=(10**18, 10**18))
    assert checkpoint.weights_stamp(str(a)) != checkpoint.weights_stamp(str(b))
    assert checkpoint.weights_stamp(str(a)) == checkpoint.weights_stamp(str(a))


def test_json_nested_too_deep_is_a_message_never_a_traceback(tmp_path):
    """100,000 levels deep: a released file is refused by name, a pairs or cache line is skipped with its
    line, a stage key is unreadable (recomputed), a judge's reply is a failed reply."""
    deep = "[" * 100000 + "]" * 100000
    released = tmp_path / "released.json"
    released.write_text(deep)
    with pytest.raises(ValueError, match="released.json"):
        real_data.read_released_pairs(str(released), str(tmp_path))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(deep + "\n" + json.dumps({"prompt": "q", "chosen": "yes", "rejected": "no"}) + "\n")
    said = []
    assert len(checkpoint.read_jsonl(str(pairs), said.append)) == 1 and any("pairs.jsonl:1" in s for s in said)
    cache = tmp_path / "judge_cache.jsonl"
    cache.write_text(deep + "\n" + json.dumps({"key": "k", "status": "ok", "score": 5}) + "\n")
    assert list(judge_guard.load_cache(str(cache), lambda *a: None)) == ["k"]
    key = tmp_path / "x.key.json"
    key.write_text(deep)
    assert checkpoint.read_json(str(key), lambda *a: None) is None
    assert score.parse_score('{"score": ' + "[" * 100000 + "]" * 100000 + "}") == (None, False)
