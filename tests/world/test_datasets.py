"""Real-dataset loaders on tiny fixture folders made by the tests; the released preference file;
train.py on real-layout data through --model.  python -m pytest -q tests/test_datasets.py"""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import data
from world import real_data
import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "official_mmedpo_vqa-rad_sample.json")
TINY_BASE = os.path.join(ROOT, "assets", "tiny-base")


def write_image(path, size=(40, 40), seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0])) * 255).astype(np.uint8)).convert("RGB").save(path)


@pytest.fixture
def slake(tmp_path):
    root = tmp_path / "slake"
    for i in range(3):
        write_image(str(root / "imgs" / f"xmlab{i}" / "source.jpg"), seed=i)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 12:24] = 255
    Image.fromarray(mask).save(root / "imgs" / "xmlab0" / "mask.png")
    (root / "imgs" / "xmlab1" / "detection.json").write_text(json.dumps([{"Liver": [5, 6, 10, 8]}]))
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(root / "imgs" / "xmlab2" / "mask.png")  # wrong size
    rec = lambda i, img, q, a, t, lang="en": {"img_id": i, "img_name": f"{img}/source.jpg", "question": q, "answer": a,
                                              "q_lang": lang, "answer_type": t, "modality": "CT", "location": "Abdomen",
                                              "qid": i}
    records = [rec(0, "xmlab0", "Where is the liver?", "Left", "OPEN"),
               rec(1, "xmlab1", "Is the liver healthy?", "Yes", "CLOSED"),
               rec(2, "xmlab2", "Does the picture contain a kidney?", "No", "CLOSED"),
               rec(3, "xmlab0", "肝脏在哪里？", "左边", "OPEN", lang="zh"),
               rec(4, "xmlab9", "Where is the lesion?", "Right", "OPEN"),       # missing image
               rec(5, "xmlab1", "What modality is this?", "", "OPEN")]          # no answer
    (root / "train.json").write_text(json.dumps(records))
    (root / "test.json").write_text(json.dumps(records[:2]))
    return root


def test_slake_loader_keeps_english_and_counts_what_it_skips(slake):
    logs = []
    items, store = real_data.load_slake(str(slake), "train", logs.append)
    assert [it["answer"] for it in items] == ["Left", "Yes", "No"]
    assert [it["type"] for it in items] == ["open", "closed", "closed"]
    assert any("1 (missing image)" in l and "1 (no answer)" in l and "1 (not English)" in l for l in logs)
    assert store.pixels(items[0]["image_id"]).shape == (40, 40)
    m = store.mask(items[0]["image_id"])                      # from mask.png
    assert m.sum() == 10 * 12 and m[15, 15] == 1
    m = store.mask(items[1]["image_id"])                      # from detection.json [x, y, w, h]
    assert m.sum() == 10 * 8 and m[6, 5] == 1 and m[14, 15] == 0
    with pytest.raises(ValueError, match="mask is 30x30.*40x40"):
        store.mask(items[2]["image_id"])


def test_visual_pairs_on_slake_skip_a_mask_of_the_wrong_size(slake, tmp_path):
    items, store = real_data.load_slake(str(slake), "train", lambda s: None)
    logs = []
    pairs = data.build_visual_pairs(items, store, str(tmp_path / "pairs"), data.heatmap_tool("mask", store=store, log=logs.append), log=logs.append)
    assert len(pairs) == 2 and "1 mask does not fit" in logs[-1]
    assert all(os.path.isfile(p["image"]) and os.path.isfile(p["rejected_image"]) for p in pairs)


def test_missing_dataset_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="Download SLAKE"):
        real_data.load_slake(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="VQA_RAD Dataset Public.json"):
        real_data.load_vqa_rad(str(tmp_path), "train")


def test_vqa_rad_test_split_is_the_test_phrase_types(tmp_path):
    root = tmp_path / "vqarad"
    for name in ("synpic1.jpg", "synpic2.jpg"):
        write_image(str(root / "VQA_RAD Image Folder" / name))
    rec = lambda q, a, t, pt, img="synpic1.jpg": {"image_name": img, "question": q, "answer": a, "answer_type": t,
                                                  "phrase_type": pt, "question_type": "PRES", "qid": q}
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps([
        rec("Is there a mass?", "yes", "CLOSED", "freeform"), rec("Is there a mass", "Yes", "CLOSED", "para"),
        rec("Where is the mass?", "left lobe", "OPEN", "test_freeform", "synpic2.jpg"),
        rec("What is wrong?", "effusion", "OPEN", "test_para", "missing.jpg")]))
    train_items, _ = real_data.load_vqa_rad(str(root), "train", lambda s: None)
    test_items, store = real_data.load_vqa_rad(str(root), "test", lambda s: None)
    assert len(train_items) == 2 and [it["answer"] for it in test_items] == ["left lobe"]
    assert test_items[0]["type"] == "open" and os.path.isfile(store.path(test_items[0]["image_id"]))


@pytest.mark.parametrize("name", ["iu-xray", "mimic-cxr"])
def test_r2gen_layout_reports(tmp_path, name):
    root = tmp_path / name
    write_image(str(root / "images" / "CXR1_1_IM-0001" / "0.png"))
    write_image(str(root / "images" / "CXR2_1_IM-0002" / "0.png"))
    ann = {"train": [{"id": "CXR1_1_IM-0001", "report": "The heart is normal. No effusion.",
                      "image_path": ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"], "split": "train"},
                     {"id": "CXR3", "report": "Clear lungs.", "image_path": ["CXR3/0.png"], "split": "train"}],
           "test": [{"id": "CXR2_1_IM-0002", "report": "Mild cardiomegaly.", "image_path": ["CXR2_1_IM-0002/0.png"],
                     "split": "test"}]}
    (root / "annotation.json").write_text(json.dumps(ann))
    items, store = real_data.LOADERS[name](str(root), "train", lambda s: None)
    assert len(items) == 1 and items[0]["type"] == "report" and "describe" in items[0]["question"].lower()
    assert items[0]["answer"] == "The heart is normal. No effusion."
    from world.eval import format_table, vqa_metrics
    m = vqa_metrics(items, ["The heart is normal. No effusion."])
    assert m["bleu_mean"] == pytest.approx(1.0, abs=1e-6) and m["rouge_l"] == pytest.approx(1.0)
    assert "ROUGE-L" in format_table({"x": m})


@pytest.mark.parametrize("name", ["slake", "iu-xray"])
def test_a_dataset_image_outside_its_folder_is_never_read(tmp_path, name):
    """An annotation naming '../../secret/s.png' (or an absolute path) is skipped and named, as released
    files are checked against --images."""
    root, secret = tmp_path / "data", tmp_path / "secret" / "s.png"
    write_image(str(secret))
    write_image(str(root / "imgs" / "a" / "source.jpg"))
    write_image(str(root / "images" / "a" / "0.png"))
    escape = "../../secret/s.png"
    if name == "slake":
        rec = lambda n, img: {"qid": n, "img_name": img, "question": "Is there a mass?", "answer": "Yes",
                              "answer_type": "CLOSED", "q_lang": "en", "content_type": "Abnormality"}
        (root / "train.json").write_text(json.dumps([rec(1, "a/source.jpg"), rec(2, "../" + escape), rec(3, str(secret))]))
    else:
        rec = lambda n, img: {"id": n, "report": "Clear lungs.", "image_path": [img]}
        (root / "annotation.json").write_text(json.dumps({"train": [rec(1, "a/0.png"), rec(2, escape), rec(3, str(secret))]}))
    logs = []
    items, _ = real_data.LOADERS[name](str(root), "train", logs.append)
    assert len(items) == 1 and all("secret" not in it["image_id"] for it in items)
    assert sum("record" in l and "is outside --data-dir" in l for l in logs) == 2


@pytest.fixture
def released(tmp_path):
    images = tmp_path / "images"
    records = json.load(open(FIXTURE))
    for r in records[:-1]:                                     # the last record's image is missing
        write_image(str(images / r["image"]))
    return FIXTURE, str(images), records


def test_released_file_reads_and_skips_leaks_and_missing_images(released):
    path, images, records = released
    logs = []
    pairs, skipped = real_data.read_released_pairs(path, images, logs.append)
    # record 1055's chosen answer leaks the curation prompt but ends in its Original Answer: recovered
    assert skipped == 1 and len(pairs) == 11 and any("not found" in l for l in logs)
    assert pairs[0]["id"] == "released-1055" and pairs[0]["chosen"] == "DWI"
    assert any("1 chosen answers recovered" in l for l in logs)
    first = pairs[1]
    assert first["prompt"] == "Are there other abnormalities besides the mass in the temporal horn?"
    assert first["chosen"] == "Yes" and first["rejected"].startswith("No,") and first["score"] == 0.2
    assert first["source"] == "text" and first["rejected_image"] is None


def test_recover_chosen_only_when_unambiguous():
    assert real_data.recover_chosen("Question: Does the picture contain heart?\n Yes") == "Yes"
    scaffold = "Question: What is this?\n-Original Answer: X-Ray\n-Candidate Answer1: CT\n\n X-Ray"
    assert real_data.recover_chosen(scaffold) == "X-Ray"
    assert real_data.recover_chosen(scaffold.replace("\n\n X-Ray", "\n\n CT")) is None    # disagrees with the original
    assert real_data.recover_chosen("-Original Answer: X-Ray\n-Candidate Answer1: CT") is None  # ends in scaffolding
    assert real_data.recover_chosen("Yes") is None                                           # nothing to recover


def test_released_rejected_scaffolding_is_still_skipped(tmp_path):
    write_image(str(tmp_path / "a.jpg"))
    rec = {"id": 7, "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nq?"},
                                                       {"from": "gpt", "value": "Question: q?\n Yes"}],
           "rejected_conversations": [{"from": "human", "value": "<image>\nq?"},
                                      {"from": "gpt", "value": "Question: q?\n No"}], "weighted_score": 0.5}
    (tmp_path / "r.json").write_text(json.dumps([rec]))
    logs = []
    pairs, skipped = real_data.read_released_pairs(str(tmp_path / "r.json"), str(tmp_path), logs.append)
    assert (len(pairs), skipped) == (0, 1) and "in the rejected answer" in logs[0] and "id 7" in logs[0]


def test_export_to_the_common_preference_layout(released, tmp_path):
    path, images, _ = released
    pairs, _ = real_data.read_released_pairs(path, images, lambda s: None)
    real_data.export_pairs(data.assign_weights(pairs), str(tmp_path / "export.jsonl"))
    rows = [json.loads(l) for l in (tmp_path / "export.jsonl").read_text().splitlines()]
    assert len(rows) == 11 and set(rows[0]) >= {"prompt", "chosen", "rejected", "images"}
    assert rows[0]["prompt"].startswith("<image>\n") and os.path.isfile(rows[0]["images"][0])


def test_train_on_the_released_file_through_model(released, tmp_path):
    path, images, _ = released
    out = tmp_path / "out"
    train.main(["--model", TINY_BASE, "--pairs", path, "--images", images, "--out", str(out), "--batch-size", "2",
                "--epochs", "1", "--n-test", "4", "--export-pairs", str(tmp_path / "export.jsonl"), "--weighting", "raw"])
    metrics = json.loads((out / "mmedpo" / "metrics.json").read_text())
    assert metrics["steps"] == 5 and metrics["records"]["text"] == 11
    pairs, _ = data.read_pairs(str(out / "mmedpo" / "records.jsonl"))     # what was trained on, with its weights
    released = {f"released-{r['id']}": r["weighted_score"] for r in json.load(open(path))}
    assert all(p["weight"] == released[p["id"]] for p in pairs)  # --weighting raw: the authors' weights as released
    assert any(p["weight"] == 0.0 for p in pairs)
    assert (tmp_path / "export.jsonl").exists()
    import lora
    from transformers import AutoModelForImageTextToText
    lora.load_adapter(AutoModelForImageTextToText.from_pretrained(TINY_BASE), out / "mmedpo" / "adapter")


def test_train_on_slake_layout_with_masks(slake, tmp_path):
    out = tmp_path / "out"
    train.main(["--model", TINY_BASE, "--data", "slake", "--data-dir", str(slake), "--out", str(out),
                "--heatmap", "mask", "--batch-size", "2", "--epochs", "1", "--pad-to-square"])
    pairs, _ = data.read_pairs(str(out / "pairs" / "mmedpo.jsonl"))
    assert {p["source"] for p in pairs} == {"text", "visual"}
    assert sum(p["source"] == "visual" for p in pairs) == 2      # the wrong-size mask was skipped
    assert json.loads((out / "mmedpo" / "metrics.json").read_text())["after"]["n_closed"] == 1


def test_bad_paths_and_checkpoints_get_clear_messages(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--data", "slake"])                                   # no --data-dir
    assert "--data-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--data", "slake", "--data-dir", str(tmp_path)])      # no --model
    assert "--model" in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(TINY_BASE, bare)
    for name in os.listdir(bare):
        if name.startswith(("processor", "preprocessor", "tokenizer")):
            os.remove(bare / name)
    with pytest.raises(SystemExit, match="no preprocessor_config.json or processor_config.json"):
        train.main(["--model", str(bare), "--out", str(tmp_path / "o")])


def test_released_records_that_cannot_be_pairs_are_named_and_skipped(tmp_path):
    """One bad record costs that record, named with its reason: never the file, never a crash later."""
    from PIL import Image
    Image.new("L", (8, 8), 128).save(tmp_path / "a.png")
    Image.new("L", (8, 8), 64).save(tmp_path / "b.png")
    turn = lambda who, text: {"from": who, "value": text}
    def record(i, prompt="<image>\nIs there a mass?", chosen=" yes", rejected=" no", roles=("human", "gpt"),
               rejected_prompt=None, **extra):
        return {"id": i, "image": "a.png", "conversations": [turn(roles[0], prompt), turn(roles[1], chosen)],
                "rejected_conversations": [turn("human", rejected_prompt or prompt), turn("gpt", rejected)],
                "weighted_score": 0.5, **extra}
    records = [record(0), record(1, roles=("gpt", "human")), record(2, rejected_prompt="<image>\nIs there a nodule?"),
               record(3, chosen=" yes <image>"), record(4, image="a\x00.png"), record(5, rejected=" n\ud800o"),
               record(6, rejected_image="a.png"), record(7, rejected_image="b.png")]
    path = tmp_path / "released.json"
    path.write_text(json.dumps(records))
    said = []
    pairs, skipped = real_data.read_released_pairs(str(path), str(tmp_path), said.append)
    assert [p["id"] for p in pairs] == ["released-0", "released-7"] and skipped == 6
    reasons = {1: "roles", 2: "another question", 3: "<image> tag", 4: "NUL", 5: "lone surrogate", 6: "the image itself"}
    for i, reason in reasons.items():
        assert any(f"(id {i})" in line and reason in line for line in said), (i, said)


def test_a_float_image_keeps_its_range():
    import numpy as np
    from PIL import Image
    import tempfile
    path = os.path.join(tempfile.mkdtemp(), "ct.tiff")
    Image.fromarray(np.linspace(-1000, 3000, 64, dtype=np.float32).reshape(8, 8), "F").save(path)
    x = data.read_image(path)
    assert x.min() == 0 and x.max() == 1 and 0.4 < x.mean() < 0.6        # stretched, not clipped black
