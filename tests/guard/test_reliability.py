"""No input overwritten, no finished round lost, no key written from a reply, no silent resume, every
value a user types checked before work starts, caches keyed on content.
python -m pytest -q tests/test_reliability.py"""
import errno
import json
import os

import numpy as np
import pytest
import torch

from guard import checkpoint
import data
from world import real_data
import score
import train
from test_score import server_factory  # noqa: F401  (the fault-injecting server, a fixture)
from guard import judge as judge_guard
from lab import fire, score_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_BASE = os.path.join(ROOT, "assets", "tiny-base")
SMALL = ["--n-train", "60", "--n-test", "4", "--n-text", "12", "--n-visual", "8", "--batch-size", "4", "--epochs", "1"]


# -----------------------------------------------------------------------------
# every value a user types is checked before work starts, naming its flag

def test_an_output_never_replaces_an_input_or_a_stage_file(tmp_path, capsys):
    released = tmp_path / "released.json"
    released.write_text("[]")
    for target in (released, tmp_path / "out" / "pairs" / "mmedpo.jsonl", tmp_path / "out" / "mmedpo" / "x.jsonl"):
        with pytest.raises(SystemExit):
            train.main(["--out", str(tmp_path / "out"), "--pairs", str(released), "--images", str(tmp_path),
                        "--export-pairs", str(target)])
        assert "--export-pairs" in capsys.readouterr().err
    assert released.read_text() == "[]"
    pairs = tmp_path / "p.jsonl"
    pairs.write_text("{}\n")
    with pytest.raises(SystemExit):
        score_cli.main(["--pairs", str(pairs), "--out", str(pairs)])
    assert "would be overwritten" in capsys.readouterr().err and pairs.read_text() == "{}\n"


def test_no_tool_writes_into_another_runs_files(tmp_path, capsys):
    """An adapter, a stage file vouched for by its key, a run's metrics and a model's config are refused as
    any tool's output, links resolved; nothing is touched."""
    from world import eval as evaluation
    out = tmp_path / "out"
    (out / "mmedpo" / "adapter").mkdir(parents=True)
    (out / "mmedpo" / checkpoint.RUN_LOCK).write_text("")
    (out / "mmedpo" / "adapter" / "adapter_config.json").write_text("{}")
    (out / "pairs").mkdir()
    for name, text in (("mmedpo.jsonl", "{}\n"), ("mmedpo.jsonl.key.json", "{}")):
        (out / "pairs" / name).write_text(text)
    (tmp_path / "link").symlink_to(out / "mmedpo")
    adapter = out / "mmedpo" / "adapter" / "adapter_model.safetensors"
    with pytest.raises(SystemExit):
        train.main(["--out", str(out), "--run-name", "other", "--export-pairs", str(adapter)])
    assert "an adapter" in capsys.readouterr().err
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "q?", "chosen": "yes", "rejected": "no"}) + "\n")
    for target, why in ((out / "pairs" / "mmedpo.jsonl", "a stage file"), (tmp_path / "link" / "metrics.json", "a run folder")):
        with pytest.raises(SystemExit):
            score_cli.main(["--pairs", str(pairs), "--out", str(target)])
        assert why in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluation.main(["--model", TINY_BASE, "--out", os.path.join(TINY_BASE, "config.json")])
    assert "a model" in capsys.readouterr().err
    assert (out / "pairs" / "mmedpo.jsonl").read_text() == "{}\n" and not (out / "mmedpo" / "metrics.json").exists()


def test_every_stage_folder_is_guarded_not_only_this_runs(tmp_path):
    """Another --out's judge cache (finished scores), a stage image, a stage key and a file three folders
    inside a run folder are each refused as an output; a plain file beside the run folders is not."""
    other = tmp_path / "other_out"
    (other / "pairs" / "images").mkdir(parents=True)
    (other / "pairs" / "judge_cache.jsonl").write_text('{"key": "k", "status": "ok"}\n')
    (other / "pairs" / "mmedpo.jsonl.key.json").write_text("{}")
    (other / "pairs" / "images" / "x.png").write_bytes(b"png")
    (other / "mmedpo" / "a" / "b").mkdir(parents=True)
    (other / "mmedpo" / checkpoint.RUN_LOCK).write_text("")
    for target in (other / "pairs" / "judge_cache.jsonl", other / "pairs" / "images" / "x.png",
                   other / "pairs" / "mmedpo.jsonl.key.json", other / "mmedpo" / "a" / "b" / "c.jsonl",
                   tmp_path / "elsewhere" / "judge_cache.jsonl", tmp_path / "z.key.json"):
        assert checkpoint.guarded_output(str(target)), target
    assert checkpoint.guarded_output(str(other / "scores.jsonl")) is None
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "q?", "chosen": "yes", "rejected": "no"}) + "\n")
    with pytest.raises(SystemExit):
        score_cli.main(["--pairs", str(pairs), "--out", str(other / "pairs" / "judge_cache.jsonl")])
    assert (other / "pairs" / "judge_cache.jsonl").read_text() == '{"key": "k", "status": "ok"}\n'


def test_an_input_named_like_a_temporary_file_survives(tmp_path):
    pairs = tmp_path / "scored.jsonl.tmp"
    pairs.write_text(json.dumps({"prompt": "Is there a nodule?", "chosen": "yes", "rejected": "no"}) + "\n")
    score_cli.main(["--pairs", str(pairs), "--out", str(tmp_path / "scored.jsonl")])
    assert pairs.exists() and json.loads((tmp_path / "scored.jsonl").read_text())["score"] is not None


def test_a_second_writer_is_refused(tmp_path):
    lock = checkpoint.RunLock(str(tmp_path / "mmedpo"))
    try:
        with pytest.raises(SystemExit, match="in use by another run"):
            train.main(["--out", str(tmp_path)] + SMALL)
    finally:
        lock.release()


def test_a_full_disk_is_said_and_the_old_file_kept(tmp_path):
    path = tmp_path / "metrics.json"
    checkpoint.write_json(str(path), {"old": 1})

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(checkpoint.DiskFull, match="the disk is full"):
        checkpoint.atomic_write(str(path), full)
    assert json.loads(path.read_text()) == {"old": 1} and os.listdir(tmp_path) == ["metrics.json"]


# -----------------------------------------------------------------------------
# caches key on content

def test_the_reference_key_follows_image_content_at_an_unchanged_path(tmp_path):
    img = tmp_path / "noised.png"
    data.save_png(data.to_pil(np.zeros((8, 8))), str(img))
    records = [{"image": str(img), "rejected_image": str(img), "prompt": "q?", "chosen": "yes", "rejected": "yes"}]
    run = train.Run(train.parse_args(["--out", str(tmp_path)]), 0, 1, torch.device("cpu"), torch.float32, "", "")
    before = train.reference_key(run, TINY_BASE, records, 2, 64)
    data.save_png(data.to_pil(np.ones((8, 8))), str(img))          # the noise step changed: same path, new pixels
    assert train.reference_key(run, TINY_BASE, records, 2, 64) != before
    data.save_png(data.to_pil(np.zeros((8, 8))), str(img))
    assert train.reference_key(run, TINY_BASE, records, 2, 64) == before


def test_a_resume_continues_only_the_same_computation(tmp_path):
    records = [{"image": "a.png", "prompt": "q?", "chosen": "yes", "rejected": "no", "weight": 1.0}]
    run = train.Run(train.parse_args(["--out", str(tmp_path)]), 0, 1, torch.device("cpu"), torch.float32, "", "")
    inputs = train.inputs_of(run, TINY_BASE, records, 64)
    config = {**vars(run.args), "world": 1}
    ck = {"config": config, "inputs": inputs}
    assert checkpoint.check_checkpoint(ck, config, inputs, train.flags.RESUME_FLAGS) == []
    reweighted = train.inputs_of(run, TINY_BASE, [{**records[0], "weight": 1.2}], 64)   # a healthy judge, new weights
    assert checkpoint.check_checkpoint(ck, config, reweighted, train.flags.RESUME_FLAGS) == ["the records differ"]
    longer = train.inputs_of(run, TINY_BASE, records, 128)
    assert checkpoint.check_checkpoint(ck, {**config, "max_length": 128}, longer, train.flags.RESUME_FLAGS) == \
        ["--max-length None -> 128", "the encoding differ"]


def test_truncation_is_counted_with_loader_workers(tmp_path, capsys):
    train.main(["--out", str(tmp_path), "--base", TINY_BASE, "--max-length", "28", "--loader-workers", "2"] + SMALL)
    printed = capsys.readouterr().out
    assert "rows had their prompt truncated to fit 28 tokens" in printed


# -----------------------------------------------------------------------------
# replies: checked before they are stored or used

def test_a_reply_holding_the_key_is_a_failed_reply_and_never_stored(server_factory, tmp_path, monkeypatch):
    secret = "sk-echoed-back-4242"
    monkeypatch.setenv("MMEDPO_TEST_KEY", secret)
    srv = server_factory(reply=lambda body: f'{{"score": 8}} (you sent Bearer {secret})')
    j = judge_guard.HTTPJudge("med", srv.url, "m", key_env="MMEDPO_TEST_KEY", retry=judge_guard.Retry(1, 0.01))
    cache = tmp_path / "cache.jsonl"
    out = score.score_pairs([{"prompt": "q?", "chosen": "yes", "rejected": "no"}], [j], str(cache), log=lambda m: None)
    assert out[0]["status"] == "failed" and "holds (part of) the API key" in out[0]["reason"] and secret not in out[0]["reason"]
    assert secret not in cache.read_text()
    edits = score.edit_answers([{"question": "q?", "answer": "yes"}], ["no"], j, str(tmp_path / "edits.jsonl"),
                               log=lambda m: None)
    assert edits[0]["status"] == "failed" and secret not in (tmp_path / "edits.jsonl").read_text()


class Editor:
    name, model = "llm", "m"

    def __init__(self, reply):
        self.reply = reply

    def __call__(self, messages):
        return self.reply


@pytest.mark.parametrize("reply, why", [("NaN", "not a minimal edit"), ("yes", "the wrong yes/no"),
                                        ("The lungs are clear and the heart is normal in size.", "not a minimal edit")])
def test_an_llm_edit_gets_the_rule_editors_checks(reply, why):
    question, truth = ("Is there a nodule?", "no") if why == "the wrong yes/no" else \
        ("Where is the mass?", "right upper")
    answer = "yes" if truth == "no" else "there is a mass in the left upper zone"
    edited, how = score.edit_answer(Editor(reply), question, truth, answer)
    assert f"rejected: {why}" in how and edited != reply


def test_a_json_nan_content_is_a_malformed_reply(server_factory):
    srv = server_factory(script=[(200, float("nan"), {}, 0)])   # {"content": NaN}
    j = judge_guard.HTTPJudge("med", srv.url, "m", retry=judge_guard.Retry(1, 0.01))
    with pytest.raises(score.JudgeError, match="malformed reply"):
        j([{"role": "user", "content": "x"}])


def test_non_object_cache_lines_are_named_and_skipped(tmp_path):
    cache = tmp_path / "cache.jsonl"
    good = {"key": "k1", "status": "scored", "score": 7.0}
    cache.write_text("\n".join(["[1, 2]", "null", '"x"', json.dumps(good), json.dumps({"key": 3})]) + "\n")
    said = []
    loaded = judge_guard.load_cache(str(cache), said.append)
    assert loaded == {"k1": good}
    assert [m.split(": ")[0] for m in said] == [f"{cache}:{n}" for n in (1, 2, 3, 5)]


# -----------------------------------------------------------------------------
# data files: no file outside --images is opened, no FIFO blocks the run

def test_released_images_outside_the_folder_or_special_are_never_opened(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    os.mkfifo(images / "pipe.png")
    os.symlink("/etc/passwd", images / "link.png")
    record = lambda i, image: {"id": i, "image": image, "weighted_score": 0.5,
                               "conversations": [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": "yes"}],
                               "rejected_conversations": [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": "no"}]}
    path = tmp_path / "released.json"
    path.write_text(json.dumps([record(1, "/etc/passwd"), record(2, "link.png"), record(3, "pipe.png")]))
    opened = []
    real = checkpoint._read_image
    monkeypatch.setattr(checkpoint, "_read_image", lambda p, *a: (opened.append(p), real(p, *a))[1])
    said = []
    pairs, skipped = real_data.read_released_pairs(str(path), str(images), said.append)
    assert pairs == [] and skipped == 3 and opened == []
    assert sum("outside --images" in m for m in said) == 2 and any("pipe.png: not a regular file" in m for m in said)


# -----------------------------------------------------------------------------
# finished work is never lost, and old results never stand beside a new adapter

def test_a_later_fire_round_that_cannot_train_keeps_the_last_rounds_adapter(tmp_path, capsys, monkeypatch):
    real = fire.build_fire_pairs

    def fewer(*a, round_index=0, **k):
        records, complete = real(*a, round_index=round_index, **k)
        return (records[:1] if round_index else records), complete
    monkeypatch.setattr(fire, "build_fire_pairs", fewer)
    train.main(["--out", str(tmp_path), "--objective", "fire", "--n-text", "96", "--n-test", "4", "--batch-size", "4",
                "--epochs", "1", "--policy-rounds", "2"])
    printed = capsys.readouterr().out
    assert "fewer than one global batch (4): the run ends with round 1's adapter" in printed
    assert (tmp_path / "fire" / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "fire" / "metrics.json").read_text())["objective"] == "fire"


def test_a_rerun_that_dies_after_the_adapter_leaves_no_old_metrics(tmp_path, monkeypatch):
    args = ["--out", str(tmp_path)] + SMALL
    train.main(args)
    assert (tmp_path / "mmedpo" / "metrics.json").exists()
    monkeypatch.setattr(train, "save_pictures", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--lr", "5e-4"])
    assert (tmp_path / "mmedpo" / "adapter").exists() and not (tmp_path / "mmedpo" / "metrics.json").exists()


def test_a_refused_run_deletes_nothing(tmp_path):
    """A --resume with other flags, or a --max-length the model cannot hold, is refused before any old
    result goes: the adapter, metrics.json and predictions of the finished run stay."""
    args = ["--out", str(tmp_path)] + SMALL
    train.main(args)
    run_dir = tmp_path / "mmedpo"
    kept = {name: (run_dir / name).read_bytes() for name in ("metrics.json", "predictions.jsonl",
                                                               "adapter/adapter_model.safetensors")}
    with pytest.raises(SystemExit, match="--resume.*other settings"):
        train.main(args + ["--lr", "5e-4", "--resume"])
    with pytest.raises(SystemExit, match="--max-length 4096: the model has"):
        train.main(args + ["--max-length", "4096"])
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept


def test_another_seed_never_reuses_an_image_file(tmp_path):
    from world import synthetic
    paths = []
    for seed in (0, 1):
        images, _ = synthetic.make_synthetic(2, seed, 32, "pref")
        paths.append(synthetic.SyntheticStore(images, str(tmp_path)).path(images[0]["image_id"]))
    assert paths[0] != paths[1] and os.path.basename(paths[0]).startswith("pref00000-")
    assert data.read_image(paths[0]).tolist() != data.read_image(paths[1]).tolist()


def test_a_judge_that_fails_every_pair_stops_the_run(server_factory, tmp_path):
    srv = server_factory(script=[(404, "no such route", {}, 0)])
    with pytest.raises(SystemExit, match="every one of the 12 text pairs failed to be scored .*HTTP 404"):
        train.main(["--out", str(tmp_path), "--judge", f"med={srv.url},model=m", "--selector", "rule",
                    "--strategies", "text"] + SMALL)
    assert not (tmp_path / "mmedpo" / "adapter").exists()


def test_a_decompression_bomb_is_named_not_a_traceback(tmp_path, monkeypatch):
    from PIL import Image
    path = tmp_path / "huge.png"
    Image.new("L", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)      # 64 x 64 is then more than twice the limit
    checkpoint._read_image.cache_clear()
    with pytest.raises(ValueError, match="cannot read image .*huge.png"):
        data.read_image(str(path))


def test_a_base_cut_short_is_never_taken_for_a_base(tmp_path, monkeypatch):
    from world import synthetic
    from transformers import LlavaProcessor

    def full_disk(self, folder, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(LlavaProcessor, "save_pretrained", full_disk)
    with pytest.raises(OSError):
        synthetic.build_base(str(tmp_path / "base"), n_train=8, steps=2, log=lambda *a: None)
    assert not (tmp_path / "base").exists()          # so the next run builds it again instead of reusing it


def test_a_relative_out_is_the_same_folder_as_its_absolute_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative, absolute = train.parse_args(["--out", "runs"]), train.parse_args(["--out", str(tmp_path / "runs")])
    assert relative.out == absolute.out == str(tmp_path / "runs")


def test_a_base_is_never_built_over_a_folder_the_project_did_not_make(tmp_path):
    """A typo in --base that names someone's folder stops the run, naming the flag, and deletes nothing."""
    folder = tmp_path / "mydata"
    folder.mkdir()
    (folder / "results.csv").write_text("keep me")
    with pytest.raises(SystemExit, match="--base .*did not make"):
        train.main(["--out", str(tmp_path / "out"), "--base", str(folder), "--base-only"])
    assert (folder / "results.csv").read_text() == "keep me"
    with pytest.raises(SystemExit, match="did not make"):   # --rebuild-base over a model folder it did not build
        train.main(["--out", str(tmp_path / "out"), "--base", str(folder), "--base-only", "--rebuild-base"])
    assert os.listdir(folder) == ["results.csv"]


@pytest.mark.parametrize("spec", ["med=http://user:SECRETKEY123@127.0.0.1:9/v1,model=m",
                                  "med=http://127.0.0.1:9/v1?api_key=SECRETKEY123,model=m",
                                  "med=http://127.0.0.1:9/v1,model=m,key_env=sk-SECRETKEY123"])
def test_a_key_in_a_judge_spec_is_refused_and_never_printed(spec, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path), "--judge", spec])
    said = capsys.readouterr()
    assert "SECRETKEY123" not in said.out + said.err and "--judge" in said.err


# -----------------------------------------------------------------------------
# a model or adapter folder that is not what it claims is named, never a traceback nor random weights

def copied_base(tmp_path):
    import shutil
    base = tmp_path / "base"
    shutil.copytree(TINY_BASE, base)
    return base


@pytest.mark.parametrize("fault, message", [
    ("truncated", "truncated"), ("huge header", "not a whole safetensors"), ("no tokenizer", "tokenizer.json"),
    ("config disagrees", "disagrees with the weights"), ("config not json", "config.json")])
def test_a_broken_model_folder_is_named(tmp_path, fault, message):
    base = copied_base(tmp_path)
    weights = base / "model.safetensors"
    if fault == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif fault == "huge header":
        weights.write_bytes((1 << 40).to_bytes(8, "little") + weights.read_bytes()[8:])
    elif fault == "no tokenizer":
        (base / "tokenizer.json").unlink()
    elif fault == "config disagrees":
        config = json.loads((base / "config.json").read_text())
        config["text_config"]["num_hidden_layers"] += 1          # a layer the weights do not hold
        (base / "config.json").write_text(json.dumps(config))
    else:
        (base / "config.json").write_text("{")
    with pytest.raises(ValueError, match=message):
        checkpoint.load_model(str(base), torch.float32, torch.device("cpu"))


def test_eval_refuses_an_adapter_of_another_base_or_a_broken_one(tmp_path):
    """An adapter records its base's weights digest; `python -m world.eval --adapter` on another base, or an
    adapter whose adapter_config.json disagrees with its weights, stops with a message."""
    import lora
    from world import eval as evaluation
    model, _ = checkpoint.load_model(TINY_BASE, torch.float32, torch.device("cpu"))
    lora.add_lora(model, r=4, alpha=8)
    lora.save_adapter(model, str(tmp_path / "adapter"), base_model_name_or_path=TINY_BASE)
    checkpoint.write_adapter_base(str(tmp_path / "adapter"), TINY_BASE)
    other = tmp_path / "other"
    import shutil
    shutil.copytree(os.path.join(ROOT, "assets", "tiny-base-1"), other)
    for model_path, fix in ((str(other), None), (TINY_BASE, "r")):
        if fix:
            config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
            config["r"] = 8                                                  # the weights have r = 4
            (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(SystemExit) as stop:
            evaluation.main(["--model", model_path, "--adapter", str(tmp_path / "adapter"), "--n-test", "4"])
        said = str(stop.value.code)
        assert "--adapter" in said and ("another base" in said if not fix else "shape" in said), said


def test_a_moved_out_builds_its_pairs_anew_never_pointing_at_the_old_place(tmp_path, capsys):
    """Preference records hold absolute image paths; after `mv OUT OUT2` the pairs in OUT2 must not name
    files under OUT (which may be gone, or hold something else)."""
    import shutil
    train.main(["--out", str(tmp_path / "a"), *SMALL])
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    capsys.readouterr()
    train.main(["--out", str(tmp_path / "b"), *SMALL])
    assert "building mmedpo preference data" in capsys.readouterr().out
    records, _ = data.read_pairs(str(tmp_path / "b" / "pairs" / "mmedpo.jsonl"))
    paths = [p for r in records for p in (r["image"], r.get("rejected_image")) if p]
    assert paths and all(p.startswith(str(tmp_path / "b")) for p in paths)
