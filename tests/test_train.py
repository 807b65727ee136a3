"""The pipeline end to end on a miniature default, resume, DDP, the reference precompute, and the reading
order (every file downward; one traced MMedPO step never calls back up a file).
python -m pytest -q tests/test_train.py      (about 40 s on 2 CPU cores)"""
import json
import os
import subprocess
import sys

import pytest
import torch

from guard import checkpoint
import data
import lora
import reading
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-train", "60", "--n-test", "6", "--sft-steps", "30", "--n-text", "12", "--n-visual", "8",
        "--batch-size", "4", "--epochs", "1", "--workers", "2"]


def run_script(args, out, env_extra=None, launcher=None):
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, "train.py"), "--out", str(out),
                                            "--base", str(out / "base")] + TINY + args
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One miniature run, in process: builds base/, pairs/, mmedpo/."""
    out = tmp_path_factory.mktemp("out")
    train.main(["--out", str(out), "--base", str(out / "base")] + TINY)  # builds the base: SFT for 30 steps
    return out


def test_end_to_end_writes_every_stage(out, capsys):
    metrics = json.loads((out / "mmedpo" / "metrics.json").read_text())
    for key in ("before", "after", "prior"):
        assert 0 <= metrics[key]["closed"] <= 1 and "per_qtype" in metrics[key]
    pairs, skipped = data.read_pairs(str(out / "pairs" / "mmedpo.jsonl"))
    visual = [p for p in pairs if p["source"] == "visual"]
    assert metrics["records"] == {"text": 12, "visual": len(visual)} and 0 < len(visual) <= 8   # some fail the check
    assert metrics["steps"] == (12 + len(visual)) // 4                   # one epoch of whole global batches
    assert all(p["tool_fall"] > 0 for p in visual)                      # the tool sees each pair's finding fall
    assert set(metrics["mechanism"]) == {"visual", "gradient", "chosen"}
    assert sum(v["share"] for v in metrics["mechanism"]["gradient"].values()) == pytest.approx(1.0)
    assert skipped == 0 and {p["source"] for p in pairs} == {"text", "visual"}
    assert all(os.path.exists(p["rejected_image"]) for p in pairs if p["source"] == "visual")
    assert all(p["weight"] is None for p in pairs)                       # the stage file holds the scores
    weighted, _ = data.read_pairs(str(out / "mmedpo" / "records.jsonl"))  # the weighting step: the run's records
    assert [p["id"] for p in weighted] == [p["id"] for p in pairs] and all(0.75 <= p["weight"] <= 1.25 for p in weighted)
    assert all(p["rejected"] != p["chosen"] for p in pairs if p["source"] == "text")
    for name in ("noise_grid.png", "curves.png", "log.jsonl", "checkpoint.pt", "adapter/adapter_config.json"):
        assert (out / "mmedpo" / name).exists(), name
    log = [json.loads(l) for l in (out / "mmedpo" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, metrics["steps"] + 1)) and all(r["loss"] > 0 for r in log)
    # the saved adapter changes the model, and loads into a fresh base
    from transformers import AutoModelForImageTextToText
    fresh = AutoModelForImageTextToText.from_pretrained(out / "base")
    lora.load_adapter(fresh, out / "mmedpo" / "adapter")
    assert any(m.lora_B.weight.abs().sum() > 0 for _, m in lora.lora_layers(fresh))


def test_a_second_run_reuses_every_stage(out, capsys):
    train.main(["--out", str(out), "--base", str(out / "base"), "--run-name", "again"] + TINY)
    printed = capsys.readouterr().out
    assert "base model:" in printed and "(reused)" in printed
    assert "mmedpo preference data: reused" in printed and "building mmedpo preference data" not in printed


def test_cached_reference_and_before_eval_follow_the_model(out, capsys):
    args = ["--out", str(out), "--base", str(out / "base"), "--run-name", "cache"] + TINY
    train.main(args)
    capsys.readouterr()
    train.main(args)
    printed = capsys.readouterr().out
    assert "reference log-probs: reused" in printed and "evaluation of the base model: reused" in printed
    assert "reference log-probs for" not in printed
    from safetensors.torch import load_file, save_file
    weights = out / "base" / "model.safetensors"
    os.utime(weights)  # a new time, the same bytes: the same model, reused (keys are on the bytes)
    train.main(args)
    assert "reference log-probs: reused" in capsys.readouterr().out
    original, tensors = weights.read_bytes(), load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})  # the same path, the same size, new weights
    try:
        train.main(args)
        printed = capsys.readouterr().out
        assert "reference log-probs for" in printed and "evaluating the base model" in printed
    finally:
        weights.write_bytes(original)


def test_one_training_step_reads_downward(out, monkeypatch):
    """One MMedPO step (the loop's second pass) read from train.py's loop: into the objective's adapter,
    data.py's batch and forward, mmedpo.py's math and the LoRA layers (the learning rate from
    checkpoint.py), and never back up inside a file."""
    traced, stage_train = [], train.stage_train

    def stage_train_traced(*args, **kwargs):
        result, calls = reading.project_calls(stage_train, *args, **kwargs)
        traced.append(calls)
        return result
    monkeypatch.setattr(train, "stage_train", stage_train_traced)
    train.main(["--out", str(out), "--base", str(out / "base"), "--run-name", "reading", "--halt-at-step", "3"] + TINY)
    calls = traced[0]
    starts = [i for i, (callee, caller) in enumerate(calls) if callee[1] == "get_lr" and caller[1] == "stage_train"]
    step = calls[starts[1]:starts[2]]
    reached = [(f, name) for f, name, _ in reading.functions(step)]
    print("one MMedPO step, in the order its functions are first called:\n" + "\n".join(f"  {f}: {name}" for f, name in reached))
    assert {f for f, _ in reached} <= {"train.py", "data.py", "mmedpo.py", "lora.py"}
    for function in [("train.py", "preference_loss"), ("data.py", "collate_records"), ("data.py", "response_logps"),
                     ("mmedpo.py", "token_logps"), ("mmedpo.py", "mmedpo_loss"), ("train.py", "log_step")]:
        assert function in reached
    assert reading.upward_calls(step) == []


def test_every_file_reads_downward():
    """In every file a helper (a function no other file names, and not needed at import) stands below each
    function of its file that calls it: a reader who follows a call never climbs back up."""
    files = reading.project_files()
    assert len(files) > 6 and [found for path in files for found in reading.upward_references(path, files)] == []


def ref_logps(model, processor, pairs, load, batch_size):
    dataset = data.RecordDataset(pairs, processor, load)
    batches = [list(range(i, min(i + batch_size, len(pairs)))) for i in range(0, len(pairs), batch_size)]
    with torch.no_grad():
        return torch.cat([data.response_logps(model, b, 2)[1].sum(-1)
                          for b in train.record_loader(dataset, batches, processor.tokenizer.pad_token_id, 0)])


def test_precomputed_reference_equals_reference_inside_the_step(out):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    processor = AutoProcessor.from_pretrained(out / "base")
    model = AutoModelForImageTextToText.from_pretrained(out / "base").eval()
    pairs, _ = data.read_pairs(str(out / "pairs" / "mmedpo.jsonl"))
    pairs = pairs[:8]
    load = lambda p: data.to_pil(data.read_image(p))
    base = ref_logps(model, processor, pairs, load, 3)
    lora.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_B.weight.normal_()
    with lora.disable_lora(model):
        pre = ref_logps(model, processor, pairs, load, 3)      # precomputed: batches of 3, adapter disabled
        step = ref_logps(model, processor, pairs, load, 8)     # inside a step: one batch of all 8 pairs
    policy = ref_logps(model, processor, pairs, load, 8)
    assert pre.shape == (8, 2) and torch.allclose(pre, step, atol=1e-5) and torch.allclose(pre, base, atol=1e-5)
    assert not torch.allclose(policy, step, atol=1e-3)  # the adapter does change the policy


def test_resume_reaches_the_same_adapter(out):
    """A run killed after step 2 and resumed ends where an uninterrupted run ends (LoRA dropout on)."""
    args = ["--ckpt-every", "1", "--epochs", "2"]
    full = run_script(args + ["--run-name", "full"], out)
    assert full.returncode == 0, full.stderr[-2000:]
    halted = run_script(args + ["--run-name", "halted", "--halt-at-step", "2"], out)
    assert halted.returncode == 0 and "halting after step 2" in halted.stdout
    assert not (out / "halted" / "adapter").exists()
    resumed = run_script(args + ["--run-name", "halted", "--resume"], out)
    total = len((out / "full" / "log.jsonl").read_text().splitlines())      # two epochs of the records
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout and f"at step 2/{total}" in resumed.stdout
    from safetensors.torch import load_file
    a = load_file(str(out / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "halted" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    steps = [json.loads(l)["step"] for l in (out / "halted" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, total + 1))                              # no step logged twice
    other = run_script(args + ["--run-name", "halted", "--resume", "--lr", "5e-4"], out)
    assert other.returncode != 0 and f"--lr {train.OBJECTIVES['mmedpo'].lr} -> 0.0005" in other.stderr
    other_data = run_script(args + ["--run-name", "halted", "--resume", "--n-text", "16"], out)
    assert other_data.returncode != 0 and "--n-text 12 -> 16" in other_data.stderr


def test_ddp_two_processes_equal_one_process_over_the_same_global_batch(out):
    common = ["--lora-dropout", "0", "--epochs", "1"]
    single = run_script(common + ["--run-name", "single", "--batch-size", "4"], out)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = run_script(common + ["--run-name", "ddp", "--batch-size", "2"], out,
                     launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517"])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "global batch 4" in ddp.stdout and ddp.stdout.count("[6/6]") == 1  # rank 0 alone prints and writes
    from safetensors.torch import load_file
    a = load_file(str(out / "single" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "ddp" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    # float32 sums in another order (2 ranks, any thread count) can flip Adam's step on a weight whose
    # gradient is near 0 (Adam makes every step about lr long), so no max |a - b| bound tells rounding from a
    # bug; the whole adapter's relative difference does: a wrong shard, batch or mask makes it of order 1
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5 / sum((a[k] ** 2).sum() for k in a if "lora_B" in k) ** 0.5
    print(f"relative adapter difference, 2 processes against 1: {float(diff):.2e}")
    assert diff < 0.05
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)


def test_a_saved_model_loads_through_model_and_attention_heatmaps_run(out, tmp_path, capsys):
    """--model PATH loads a checkpoint as any user's would be; --heatmap attention uses its own attention."""
    train.main(["--out", str(tmp_path), "--model", str(out / "base"), "--heatmap", "attention",
                "--strategies", "visual"] + TINY)
    pairs, _ = data.read_pairs(str(tmp_path / "pairs" / "mmedpo.jsonl"))
    assert len(pairs) == 8 and all("heatmap attention" in p["provenance"] for p in pairs)
    assert all(0 < p["score"] <= 1 for p in pairs)
    assert (tmp_path / "mmedpo" / "attention.png").exists()
    from transformers import AutoModelForImageTextToText
    fresh = AutoModelForImageTextToText.from_pretrained(out / "base")
    lora.load_adapter(fresh, tmp_path / "mmedpo" / "adapter")
    assert "building the tiny base" not in capsys.readouterr().out


def test_bad_flags_are_named(capsys):
    for flags, named in [(["--batch-size", "0"], "--batch-size"), (["--model", "/no/such/folder"], "--model"),
                         (["--prompt-format", "Question: {question}"], "--prompt-format")]:   # no <image>
        with pytest.raises(SystemExit):
            train.main(flags)
        assert named in capsys.readouterr().err


