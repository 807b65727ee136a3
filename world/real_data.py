"""Real data: SLAKE, VQA-RAD, IU-Xray and MIMIC-CXR from their downloaded folders, the authors' released
MMedPO preference files, and the export of our pairs for other DPO tools. Items have the synthetic
set's shape ({id, image_id, question, answer, type, qtype}, image_id = the path under the dataset root),
so every stage runs on them unchanged.

    python train.py --model PATH --data slake --data-dir SLAKE/ ...        # see the README's real experiment

Tests:  python -m pytest -q tests/test_datasets.py
"""
import json
import math
import os
import re
import stat
from collections import Counter

import numpy as np
from PIL import Image, UnidentifiedImageError

import data
from guard.checkpoint import file_digest, write_jsonl
from noise import heatmap_from_boxes
from world.rule_judge import clean_answer, words


DOWNLOAD_HINTS = {
    "slake": "SLAKE (https://www.med-vqa.com/slake/): the folder holding train.json, test.json and imgs/",
    "vqa-rad": "VQA-RAD (https://osf.io/89kps/): the folder holding 'VQA_RAD Dataset Public.json' and "
               "'VQA_RAD Image Folder/'",
    "iu-xray": "IU-Xray as prepared by R2Gen: the folder holding annotation.json and images/",
    "mimic-cxr": "MIMIC-CXR as prepared by R2Gen (credentialed access on PhysioNet): the folder holding "
                 "annotation.json and images/",
}


REPORT_PROMPTS = ["Describe the following image in detail.", "Please describe this chest X-ray in detail.",
                  "Write the findings of this radiograph.", "What does this chest X-ray show? Describe it in detail."]


def load_slake(root, split="train", log=print):
    """SLAKE English records of `split` (train, validation, test). returns (items, FileStore)."""
    with open(_need(os.path.join(root, f"{split}.json"), "slake")) as f:
        records = json.load(f)
    items, skipped, masks = [], Counter(), {}
    for n, r in enumerate(records):
        if r.get("q_lang", "en") != "en":
            skipped["not English"] += 1
            continue
        answer = str(r.get("answer", "")).strip()
        image_id = os.path.join("imgs", str(r.get("img_name", "")))
        if not _usable(root, image_id, answer, skipped, log, f"{root}/{split}.json record {n}"):
            continue
        folder = os.path.join(root, os.path.dirname(image_id))
        masks[image_id] = tuple(p if os.path.isfile(p) else None for p in
                                (os.path.join(folder, "mask.png"), os.path.join(folder, "detection.json")))
        items.append(_vqa_item(f"slake-{r.get('qid', n)}", image_id, r, answer, str(r.get("answer_type", "open")).lower()))
    _report(f"SLAKE {split}", len(items), skipped, log)
    return items, FileStore(root, masks)


def load_vqa_rad(root, split="train", log=print):
    """VQA-RAD; the test split is the records whose phrase_type starts with 'test'. returns (items, FileStore)."""
    with open(_need(os.path.join(root, "VQA_RAD Dataset Public.json"), "vqa-rad")) as f:
        records = json.load(f)
    image_dir = "VQA_RAD Image Folder"
    items, skipped = [], Counter()
    for n, r in enumerate(records):
        if str(r.get("phrase_type", "")).startswith("test") != (split == "test"):
            continue
        answer = str(r.get("answer", "")).strip()
        image_id = os.path.join(image_dir, str(r.get("image_name", "")))
        if not _usable(root, image_id, answer, skipped, log, f"VQA-RAD record {n}"):
            continue
        items.append(_vqa_item(f"vqarad-{r.get('qid', n)}", image_id, r, answer, str(r.get("question_type", "open")).lower()))
    _report(f"VQA-RAD {split}", len(items), skipped, log)
    return items, FileStore(root)


def load_iu_xray(root, split="train", log=print):
    return load_r2gen(root, split, log, "iu-xray")


def load_mimic_cxr(root, split="train", log=print):
    return load_r2gen(root, split, log, "mimic-cxr")


def load_r2gen(root, split="train", log=print, name="iu-xray"):
    """A report-generation set in R2Gen's layout (annotation.json {train|val|test: [{id, report,
    image_path: [...]}]} and images/): IU-Xray, or MIMIC-CXR, whose R2Gen annotation has the same
    layout. One item per study, its first image, the report as the answer, and a prompt paraphrasing
    'Describe the following image in detail.'"""
    title, prefix = {"iu-xray": ("IU-Xray", "iu"), "mimic-cxr": ("MIMIC-CXR", "mimic")}[name]
    with open(_need(os.path.join(root, "annotation.json"), name)) as f:
        records = json.load(f).get(split, [])
    items, skipped = [], Counter()
    for n, r in enumerate(records):
        report = str(r.get("report", "")).strip()
        paths = r.get("image_path") or []
        if not report:
            skipped["no report"] += 1
            continue
        if not paths or not _usable(root, os.path.join("images", str(paths[0])), report, skipped, log,
                                    f"{root}/annotation.json {split} record {n}"):
            skipped["missing image"] += not paths
            continue
        items.append({"id": f"{prefix}-{r.get('id', n)}", "image_id": os.path.join("images", paths[0]),
                      "question": REPORT_PROMPTS[n % len(REPORT_PROMPTS)], "answer": report, "type": "report",
                      "qtype": "report"})
    _report(f"{title} {split}", len(items), skipped, log)
    return items, FileStore(root)


LOADERS = {"slake": load_slake, "vqa-rad": load_vqa_rad, "iu-xray": load_iu_xray, "mimic-cxr": load_mimic_cxr}


class FileStore(data.ImageStore):
    """Images of a dataset on disk; image_id is the path relative to `root`. Medical images are
    handled as grayscale. `masks` maps image_id -> (mask.png path or None, detection.json path or
    None), the lesion/organ annotations used by `--heatmap mask` (SLAKE has both)."""

    def __init__(self, root, masks=None, pad=False):
        self.root, self.masks, self.pad = root, masks or {}, pad
        self.has_masks = bool(self.masks)

    def path(self, image_id):
        return os.path.join(self.root, image_id)

    def pixels(self, image_id):
        return data.read_image(self.path(image_id))

    def digest(self, image_id):
        return file_digest(self.path(image_id))

    def has_lesion(self, image_id):
        return any(self.masks.get(image_id, (None, None)))

    def mask(self, image_id):
        """(H, W) uint8 from mask.png (any non-zero pixel), else from detection.json boxes, else None.
        A mask whose size differs from the image raises ValueError naming both files."""
        mask_path, det_path = self.masks.get(image_id, (None, None))
        H, W = self.pixels(image_id).shape
        if mask_path:
            from PIL import Image
            with Image.open(mask_path) as im:
                m = (np.asarray(im.convert("L")) > 0).astype(np.uint8)
            if m.shape != (H, W):
                raise ValueError(f"{mask_path}: mask is {m.shape[1]}x{m.shape[0]}, image {self.path(image_id)} is {W}x{H}")
            return m
        if det_path:
            return heatmap_from_boxes(slake_boxes(det_path), H, W).numpy().astype(np.uint8)
        return None


def slake_boxes(path):
    """SLAKE detection.json, [{"Liver": [x, y, w, h]}, ...] -> [(x0, y0, x1, y1), ...]."""
    with open(path) as f:
        records = json.load(f)
    boxes = []
    for rec in records:
        for name, (x, y, w, h) in rec.items():
            boxes.append((x, y, x + w, y + h))
    return boxes


def _need(path, name):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found. Download {DOWNLOAD_HINTS[name]}, and pass it with --data-dir")
    return path


def _usable(root, image_id, answer, skipped, log, where):
    """False (and counted, and for a missing image reported) for a record without answer or image, or whose
    image lies outside the dataset's folder."""
    if not answer:
        skipped["no answer"] += 1
        return False
    inside = os.path.realpath(root)
    if os.path.commonpath([inside, os.path.realpath(os.path.join(root, image_id))]) != inside:
        skipped["image outside --data-dir"] += 1    # '../../secret/s.png', an absolute path, a link out
        log(f"{where}: image {image_id} is outside --data-dir {root}, skipped")
        return False
    if not os.path.isfile(os.path.join(root, image_id)):
        skipped["missing image"] += 1
        log(f"{where}: image {image_id} not found, skipped")
        return False
    return True


def _vqa_item(item_id, image_id, record, answer, qtype):
    closed = str(record.get("answer_type")).upper() == "CLOSED"
    return {"id": item_id, "image_id": image_id, "question": str(record["question"]).strip(), "answer": answer,
            "type": "closed" if closed else "open", "qtype": qtype}


def _report(name, n_kept, skipped, log):
    if skipped:
        log(f"{name}: kept {n_kept} records, skipped " + ", ".join(f"{v} ({k})" for k, v in sorted(skipped.items())))


def read_released_pairs(path, images_dir, log=print):
    """The released MMedPO preference files ({id, image, conversations, rejected_conversations,
    weighted_score[, rejected_image]}) as this project's pairs; weighted_score becomes the raw score.
    A chosen answer with leaked scaffolding is recovered when its true answer is unambiguous
    (`recover_chosen`) and counted; records whose rejected answer leaks, whose chosen answer cannot be
    recovered, whose image is missing or whose text is empty, and those of `released_record_problem`, are
    reported with the record and the reason and skipped. Images are checked by their header, never kept.
    returns (pairs, skipped count)."""
    try:
        with open(path, encoding="utf-8-sig") as f:   # a byte-order mark is allowed
            records = json.load(f)
    except (ValueError, OSError, RecursionError) as e:
        raise ValueError(f"{path}: not a readable JSON file of released pairs ({type(e).__name__}: {e})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, found a {type(records).__name__}")
    root = os.path.realpath(images_dir)
    pairs, skipped, recovered = [], 0, 0
    for n, r in enumerate(records):
        try:
            turns = [r[c][i] for c in ("conversations", "rejected_conversations") for i in (0, 1)]
            prompt = turns[0]["value"].replace("<image>", "").strip()
            chosen, rejected = turns[1]["value"].strip(), turns[3]["value"].strip()
            roles = [t["from"] for t in turns]
        except (KeyError, IndexError, TypeError, AttributeError):
            log(f"{path} record {n}: no conversations/rejected_conversations, skipped")
            skipped += 1
            continue
        where = f"{path} record {n} (id {r.get('id')!r})"
        problem = released_record_problem(turns, roles, r, images_dir)
        if problem:
            log(f"{where}: {problem}, skipped")
            skipped += 1
            continue
        empty = [name for name, text in (("prompt", prompt), ("chosen answer", chosen), ("rejected answer", rejected))
                 if not text]
        if empty or (chosen == rejected and not r.get("rejected_image")):   # a visual pair may keep its answer
            log(f"{where}: " + (f"empty {empty[0]}" if empty else "the chosen answer equals the rejected one on the "
                                "same image, nothing to prefer") + ", skipped")
            skipped += 1
            continue
        if clean_answer(rejected) is None:
            log(f"{where}: leaked prompt scaffolding in the rejected answer, skipped")
            skipped += 1
            continue
        if clean_answer(chosen) is None:
            if recover_chosen(chosen) is None:
                log(f"{where}: leaked prompt scaffolding in the chosen answer, no unambiguous answer in it, skipped")
                skipped += 1
                continue
            chosen, recovered = recover_chosen(chosen), recovered + 1
        image = os.path.join(images_dir, str(r.get("image", "")))
        rejected_image = os.path.join(images_dir, str(r["rejected_image"])) if r.get("rejected_image") else None
        # the resolved path is checked before anything is opened: a record may name /etc/passwd, a link
        # out of --images, or a FIFO that would block a reader forever (read_image opens regular files only)
        outside = [p for p in (image, rejected_image) if p and os.path.commonpath([root, os.path.realpath(p)]) != root]
        missing = [] if outside else [p for p in (image, rejected_image) if p and image_problem(p)]
        if outside or missing or not prompt or not chosen or not rejected:
            log(f"{where}: " + (f"image {outside[0]} is outside --images {images_dir}" if outside else
                                f"image {missing[0]}: {image_problem(missing[0])}" if missing else "empty text")
                + ", skipped")
            skipped += 1
            continue
        score = r.get("weighted_score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                                  or not math.isfinite(score) or not 0 <= score <= 1):
            log(f"{where}: weighted_score {score!r} is not a number in [0, 1]; the pair gets the neutral weight")
            score = None
        pairs.append({"id": f"released-{r.get('id', n)}", "source": "visual" if rejected_image else "text",
                      "image": image, "rejected_image": rejected_image, "prompt": prompt, "chosen": chosen,
                      "rejected": rejected, "score": float(score) if isinstance(score, (int, float)) else None,
                      "weight": None, "provenance": f"released file {os.path.basename(path)}"})
    log(f"{path}: {len(pairs)} pairs ({recovered} chosen answers recovered from leaked scaffolding), {skipped} skipped")
    return pairs, skipped


def released_record_problem(turns, roles, record, images_dir):
    """Why a released record cannot be a pair, or None: text that is not clean (a NUL, a lone surrogate,
    an <image> tag inside an answer), roles out of order, a rejected answer to another question, or a
    rejected image that is the image itself (a visual pair would then teach nothing)."""
    texts = [t["value"] for t in turns] + [str(record.get("image", "")), str(record.get("rejected_image") or "")]
    if not all(isinstance(t, str) for t in texts):
        return "a turn that is not text"
    if any("\x00" in t or any(0xD800 <= ord(c) <= 0xDFFF for c in t) for t in texts):
        return "a NUL or a lone surrogate in its text or image name"
    if any("<image>" in turns[i]["value"] for i in (1, 3)):
        return "an <image> tag inside an answer"
    if roles != ["human", "gpt", "human", "gpt"]:
        return f"roles {roles}, expected human, gpt in both conversations"
    if " ".join(turns[0]["value"].split()) != " ".join(turns[2]["value"].split()):
        return "the rejected answer answers another question"
    if record.get("rejected_image") and os.path.realpath(os.path.join(images_dir, str(record["rejected_image"]))) == \
            os.path.realpath(os.path.join(images_dir, str(record.get("image", "")))):
        return "its rejected image is the image itself"
    return None


def image_problem(path):
    """Why `path` is no usable image, read from its header only (nothing decoded, nothing kept), or None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "not found"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def recover_chosen(text):
    """The true answer inside a released *chosen* answer that carries leaked curation scaffolding, or
    None when it cannot be told for sure. Two shapes are recovered: 'Question: ...\n Yes' (the answer
    is the last line) and '...-Original Answer: X\n-Candidate Answer1: ...\n\n X' (the last line,
    only when it equals the Original Answer value)."""
    lines = [l.strip() for l in str(text).strip().splitlines() if l.strip()]
    if len(lines) < 2 or clean_answer(lines[-1]) is None:
        return None
    last = clean_answer(lines[-1])
    original = re.search(r"original answer\s*:\s*(.+)", text, re.I)
    if original:
        return last if words(original.group(1)) == words(last) else None
    if len(lines) == 2 and re.match(r"question\s*:", lines[0], re.I):
        return last
    return None


def export_pairs(pairs, path):
    """Our pairs in the layout other DPO tools read: {prompt, chosen, rejected, images} per line
    (prompt with the <image> placeholder), plus rejected_images and weight for tools that use them."""
    write_jsonl(path, [{"prompt": "<image>\n" + p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
                        "images": [p["image"]], "rejected_images": [p["rejected_image"] or p["image"]],
                        "weight": p.get("weight")} for p in pairs])
