"""Data for the objectives: synthetic radiographs (the offline default) and real dataset loaders; the
building of every objective's preference records (MMedPO's text and visual pairs with their scores,
HSCR's self-contrastive triplets), with the target model's generation and attention; their JSONL
files; and the batches: records tokenised once and collated into one model batch.

The synthetic set stands in for SLAKE / VQA-RAD / IU-Xray: grayscale chest-like images (body, lung
fields, ribs, spine, heart) with 0-2 findings among six kinds placed in named zones, each with its
ground-truth mask; closed (yes/no) and open questions, and a short report. The SFT split teaches a
language prior that the preference and test splits break ("Is there a X?" is usually "no" in SFT,
half the time in test), so the tiny base hallucinates the way the paper describes: it answers from
the question instead of the image.
Convention: radiological view, the patient's right lung is on the image's left.

    python data.py            # writes a few example images and their questions to out/examples/

Tests:  python -m pytest -q tests/test_data.py tests/test_datasets.py tests/test_hscr.py
"""
import json
import os
import random
import sys
import time

import numpy as np
import torch

IGNORE_INDEX = -100
KINDS = ["nodule", "mass", "pleural effusion", "consolidation", "pneumothorax", "cardiomegaly"]
LUNG_KINDS = KINDS[:5]
SIDES, LEVELS = ["right", "left"], ["upper", "middle", "lower"]
ZONE_X = {"right": 0.31, "left": 0.69}        # image x of each lung (radiological view)
ZONE_Y = {"upper": 0.30, "middle": 0.46, "lower": 0.62}
PROMPT_FORMATS = {  # {question} is the user's question; the image placeholder comes first
    "plain": "<image>\n{question}\nAnswer:",
    "mistral": "[INST] <image>\n{question} [/INST]",  # LLaVA-Med v1.5 (Mistral-7B), llava-hf chat layout
    # the Vicuna v1 conversation of the LLaVA codebase, which the MMedPO authors trained LLaVA-Med v1.5 with
    "vicuna": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions. USER: <image>\n{question} ASSISTANT:",
}  # and "chat": the processor's own chat template, one user turn with an image and the question
# generation caps (Strategy 1 sampling, evaluation) per dataset, in new tokens: released rejected answers
# have a median of 11 words on SLAKE / VQA-RAD and 45 on IU-Xray, whose reference reports have 51
SPLITS = {"synthetic": ("train", "pref", "val", "test"), "slake": ("train", "validation", "test"), "vqa-rad": ("train", "test"),
          "iu-xray": ("train", "val", "test"), "mimic-cxr": ("train", "val", "test")}
MAX_NEW_TOKENS = {"synthetic": (48, 48), "slake": (64, 64), "vqa-rad": (64, 64), "iu-xray": (256, 256),
                  "mimic-cxr": (256, 256)}


def check_prompt_format(prompt_format, processor=None):
    """ValueError unless the format is 'chat' (with a processor that has a chat template) or a template
    holding both '<image>' and '{question}'."""
    if prompt_format == "chat":
        if processor is not None and not getattr(processor, "chat_template", None):
            raise ValueError("--prompt-format chat: the processor has no chat template; use plain, mistral, vicuna "
                             "or a template")
        return
    fmt = PROMPT_FORMATS.get(prompt_format, prompt_format)
    if "<image>" not in fmt or "{question}" not in fmt:
        raise ValueError(f"prompt format {fmt!r} needs both '<image>' and '{{question}}' (or: plain, mistral, vicuna, chat)")


def format_prompt(processor, prompt_format, question):
    """The prompt text for one question, with the image placeholder where the model expects it."""
    if prompt_format == "chat":
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return PROMPT_FORMATS.get(prompt_format, prompt_format).format(question=question)


# -----------------------------------------------------------------------------
# synthetic radiographs

def _ellipse(xx, yy, cx, cy, rx, ry, soft):
    """1 inside the ellipse, 0 outside, with an edge `soft` wide (anti-aliased at small sizes)."""
    d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    return 1.0 / (1.0 + np.exp((d - 1.0) / soft))


def render_radiograph(findings, size, rng):
    """A chest-like radiograph (H, W) float in [0, 1] and one binary mask per finding.

    findings: [{"kind": ..., "side": right|left|None, "level": upper|middle|lower|None}]"""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    soft = 0.6 / size * 4
    img = 0.06 + 0.30 * _ellipse(xx, yy, 0.5, 0.55, 0.46, 0.50, soft)                    # body
    lungs = {s: _ellipse(xx, yy, ZONE_X[s], 0.45, 0.15, 0.29, soft) for s in SIDES}
    img -= 0.20 * (lungs["right"] + lungs["left"])                                        # air is dark
    ribs = (np.sin(yy * 2 * np.pi * 7 + rng.uniform(0, 6.28)) > 0.55) * 0.06
    img += ribs * (lungs["right"] + lungs["left"])
    img += 0.35 * np.exp(-((xx - 0.5) / 0.035) ** 2) * (yy > 0.08)                        # spine
    big_heart = any(f["kind"] == "cardiomegaly" for f in findings)
    heart_r = (0.19, 0.15) if big_heart else (0.12, 0.11)
    heart = _ellipse(xx, yy, 0.55, 0.66, heart_r[0], heart_r[1], soft)
    img = img * (1 - heart) + 0.55 * heart
    masks = []
    for f in findings:
        kind = f["kind"]
        if kind == "cardiomegaly":
            lesion = heart
        else:
            side, cx, cy = f["side"], ZONE_X[f["side"]], ZONE_Y[f["level"]]
            cx += rng.uniform(-0.03, 0.03)
            cy += rng.uniform(-0.03, 0.03)
            if kind == "nodule":
                lesion = _ellipse(xx, yy, cx, cy, 0.06, 0.06, soft)
            elif kind == "mass":
                lesion = _ellipse(xx, yy, cx, cy, 0.11, 0.10, soft)
            elif kind == "consolidation":
                patchy = 0.6 + 0.4 * rng.random((size, size))
                lesion = _ellipse(xx, yy, cx, cy, 0.12, 0.08, soft) * patchy * lungs[side]
            elif kind == "pleural effusion":  # fluid fills the base, meniscus towards the side wall
                meniscus = yy > 0.56 + 0.08 * (1 - np.abs(xx - ZONE_X[side]) / 0.15)
                lesion = lungs[side] * meniscus
            else:  # pneumothorax: an apical-lateral crescent with no lung markings, darker than lung
                lateral = (xx - 0.5) * (1 if side == "left" else -1) > 0.12
                lesion = lungs[side] * (yy < 0.38) * lateral
            img += (-0.12 if kind == "pneumothorax" else 0.42) * lesion
        masks.append((lesion > 0.5).astype(np.uint8))
    img += rng.normal(0, 0.025, (size, size))
    return np.clip(img, 0, 1).astype(np.float32), masks


def sample_findings(rng):
    """0-2 findings in distinct zones; cardiomegaly in about 40 % of images."""
    findings = []
    if rng.random() < 0.4:
        findings.append({"kind": "cardiomegaly", "side": None, "level": None})
    n_lung = rng.choice([0, 1, 1, 2]) if not findings else rng.choice([0, 1])
    zones_used = set()
    for kind in rng.sample(LUNG_KINDS, n_lung):
        level = {"pleural effusion": "lower", "pneumothorax": "upper"}.get(kind) or rng.choice(LEVELS)
        side = rng.choice(SIDES)
        if (side, level) in zones_used:
            side = SIDES[1 - SIDES.index(side)]
        zones_used.add((side, level))
        findings.append({"kind": kind, "side": side, "level": level})
    return findings


def describe(f):
    return "an enlarged heart" if f["kind"] == "cardiomegaly" else f"{f['kind']} in the {f['side']} {f['level']} zone"


def make_report(findings):
    """A short templated report: 'There is a nodule in the right upper zone. The heart size is
    normal. No pleural effusion.'"""
    lung = [f for f in findings if f["kind"] != "cardiomegaly"]
    parts = [f"There is {'a ' if f['kind'] in ('nodule', 'mass') else ''}{describe(f)}." for f in lung]
    parts.append("The heart is enlarged." if len(lung) < len(findings) else "The heart size is normal.")
    if not any(f["kind"] == "pleural effusion" for f in findings):
        parts.append("No pleural effusion.")
    if not lung:
        parts.append("The lungs are clear.")
    return " ".join(parts)


LUNG_FINDING_RATE = 0.65  # P(an image has a lung finding) under sample_findings: 0.4 * 1/2 + 0.6 * 3/4
# P("yes") of "Is there a X?" per split. The SFT split teaches a language prior ("usually no"), which the
# preference split and the test split break: a model that answers from the question says "no" to a
# finding that is there. The other question types are balanced in every split.
PRESENCE_YES = {"train": 0.3, "pref": 0.5, "val": 0.5, "test": 0.5}
REPORT_PROMPT = "Describe the findings of this chest X-ray."


def make_questions(findings, rng, presence_yes=0.5):
    """Closed and open questions, and a report. `presence_yes` is P("yes") of the presence question;
    the others are balanced. Each: (question, answer, type, qtype)."""
    present = {f["kind"]: f for f in findings}
    lung = [f for f in findings if f["kind"] != "cardiomegaly"]
    qs = []
    # ask about a finding that is there with probability presence_yes / P(any lung finding)
    kind = rng.choice(lung)["kind"] if lung and rng.random() < presence_yes / LUNG_FINDING_RATE else rng.choice(
        [k for k in LUNG_KINDS if k not in present])
    qs.append((f"Is there a {kind}?", "yes" if kind in present else "no", "closed", "presence"))
    qs.append(("Is the heart enlarged?", "yes" if "cardiomegaly" in present else "no", "closed", "heart"))
    if lung:
        f = rng.choice(lung)
        side = rng.choice(SIDES)
        qs.append((f"Is the {f['kind']} in the {side} lung?", "yes" if side == f["side"] else "no",
                   "closed", "side"))
        qs.append((f"Where is the {f['kind']}?", f"{f['side']} {f['level']}", "open", "where"))
    kinds = [f["kind"] for f in lung]
    qs.append(("What abnormality is seen in the lungs?", " and ".join(sorted(kinds)) if kinds else "no abnormality",
               "open", "what"))
    qs.append((REPORT_PROMPT, make_report(findings), "report", "report"))
    return qs


def make_synthetic(n_images, seed=0, size=32, split="train", presence_yes=None):
    """Deterministic per (seed, split). The split sets the presence prior (PRESENCE_YES: skewed in
    'train', the SFT split; balanced in 'pref' and 'test') unless `presence_yes` is given. returns (images, qa):
    images: [{image_id, pixels (H, W) float32, mask (H, W) uint8 union of findings, findings, report}]
    qa:     [{id, image_id, question, answer, type, qtype}]"""
    rng = random.Random(f"{seed}-{split}")
    nrng = np.random.default_rng(rng.randrange(2 ** 32))
    images, qa = [], []
    for i in range(n_images):
        findings = sample_findings(rng)
        pixels, masks = render_radiograph(findings, size, nrng)
        image_id = f"{split}{i:05d}"
        mask = np.zeros((size, size), np.uint8)
        for m in masks:
            mask |= m
        images.append({"image_id": image_id, "pixels": pixels, "mask": mask, "findings": findings,
                       "report": make_report(findings)})
        yes = PRESENCE_YES.get(split, 0.5) if presence_yes is None else presence_yes
        for j, (q, a, t, qt) in enumerate(make_questions(findings, rng, yes)):
            qa.append({"id": f"{image_id}-{j}", "image_id": image_id, "question": q, "answer": a,
                       "type": t, "qtype": qt})
    return images, qa


def to_pil(pixels):
    """(H, W) float in [0, 1] (values outside are clipped) -> 8-bit grayscale PIL image."""
    from PIL import Image
    return Image.fromarray((np.clip(np.asarray(pixels, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8), "L")


def pad_to_square(image):
    """LLaVA's preprocessing: pad a PIL image to a square with its mean colour, centred."""
    from PIL import Image, ImageStat
    w, h = image.size
    if w == h:
        return image
    fill = tuple(int(v) for v in ImageStat.Stat(image).mean)
    square = Image.new(image.mode, (max(w, h), max(w, h)), fill if len(fill) > 1 else fill[0])
    square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return square


def load_image(path):
    """A grayscale image as (H, W) float32 in [0, 1]; 16-bit images keep their full range (65535 is
    white). A missing or corrupt file raises ValueError naming it."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I;16") or im.mode == "I":   # 16-bit grayscale (common in medical PNGs)
                return np.clip(np.asarray(im, np.float32) / 65535.0, 0, 1)
            return np.asarray(im.convert("L"), np.float32) / 255.0
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def save_png(image, path):
    """Write a PIL image atomically (temporary file, then rename): a kill never leaves a torn PNG."""
    tmp = path + ".tmp.png"
    image.save(tmp)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# images behind one interface: synthetic arrays in memory, or files of a real dataset

class SyntheticStore:
    """Synthetic images by image_id; `path` writes the PNG under `folder` the first time it is asked."""

    def __init__(self, images, folder):
        self.by_id, self.folder = {im["image_id"]: im for im in images}, folder

    def pixels(self, image_id):
        return self.by_id[image_id]["pixels"]

    def pil(self, image_id):
        return to_pil(self.pixels(image_id))

    def mask(self, image_id):
        return self.by_id[image_id]["mask"]

    def has_lesion(self, image_id):
        return bool(self.by_id[image_id]["findings"])

    def path(self, image_id):
        """The image's PNG, written the first time (atomically) or again if the file on disk is torn."""
        path = os.path.join(self.folder, image_id + ".png")
        if not (os.path.exists(path) and readable_image(path)):
            os.makedirs(self.folder, exist_ok=True)
            save_png(to_pil(self.pixels(image_id)), path)
            _READABLE[path] = True
        return path


class FileStore:
    """Images of a dataset on disk; image_id is the path relative to `root`. Medical images are
    handled as grayscale. `masks` maps image_id -> (mask.png path or None, detection.json path or
    None), the lesion/organ annotations used by `--heatmap mask` (SLAKE has both)."""

    def __init__(self, root, masks=None):
        self.root, self.masks, self._cache = root, masks or {}, {}

    def path(self, image_id):
        return os.path.join(self.root, image_id)

    def pixels(self, image_id):
        if image_id not in self._cache:
            if len(self._cache) > 512:  # a bounded cache: real datasets do not fit in memory
                self._cache.clear()
            self._cache[image_id] = load_image(self.path(image_id))
        return self._cache[image_id]

    def pil(self, image_id):
        return to_pil(self.pixels(image_id))

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
            from noise import heatmap_from_boxes
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


# -----------------------------------------------------------------------------
# real datasets: SLAKE, VQA-RAD, IU-Xray, MIMIC-CXR; items as the synthetic ones, image_id = path under root

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


def _need(path, name):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found. Download {DOWNLOAD_HINTS[name]}, and pass it with --data-dir")
    return path


def _usable(root, image_id, answer, skipped, log, where):
    """False (and counted, and for a missing image reported) for a record without answer or image."""
    if not answer:
        skipped["no answer"] += 1
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


def load_slake(root, split="train", log=print):
    """SLAKE English records of `split` (train, validation, test). returns (items, FileStore)."""
    from collections import Counter
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
    from collections import Counter
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


def load_r2gen(root, split="train", log=print, name="iu-xray"):
    """A report-generation set in R2Gen's layout (annotation.json {train|val|test: [{id, report,
    image_path: [...]}]} and images/): IU-Xray, or MIMIC-CXR, whose R2Gen annotation has the same
    layout. One item per study, its first image, the report as the answer, and a prompt paraphrasing
    'Describe the following image in detail.'"""
    from collections import Counter
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
        if not paths or not os.path.isfile(os.path.join(root, "images", paths[0])):
            skipped["missing image"] += 1
            continue
        items.append({"id": f"{prefix}-{r.get('id', n)}", "image_id": os.path.join("images", paths[0]),
                      "question": REPORT_PROMPTS[n % len(REPORT_PROMPTS)], "answer": report, "type": "report",
                      "qtype": "report"})
    _report(f"{title} {split}", len(items), skipped, log)
    return items, FileStore(root)


def load_iu_xray(root, split="train", log=print):
    return load_r2gen(root, split, log, "iu-xray")


def load_mimic_cxr(root, split="train", log=print):
    return load_r2gen(root, split, log, "mimic-cxr")


LOADERS = {"slake": load_slake, "vqa-rad": load_vqa_rad, "iu-xray": load_iu_xray, "mimic-cxr": load_mimic_cxr}


def recover_chosen(text):
    """The true answer inside a released *chosen* answer that carries leaked curation scaffolding, or
    None when it cannot be told for sure. Two shapes are recovered: 'Question: ...\n Yes' (the answer
    is the last line) and '...-Original Answer: X\n-Candidate Answer1: ...\n\n X' (the last line,
    only when it equals the Original Answer value)."""
    import re
    from score import clean_answer, words
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


def read_released_pairs(path, images_dir, log=print):
    """The released MMedPO preference files ({id, image, conversations, rejected_conversations,
    weighted_score[, rejected_image]}) as this project's pairs; weighted_score becomes the raw score.
    A chosen answer with leaked scaffolding is recovered when its true answer is unambiguous
    (`recover_chosen`) and counted; records whose rejected answer leaks, whose chosen answer cannot be
    recovered, whose image is missing or whose text is empty are reported with the reason and skipped.
    returns (pairs, skipped count)."""
    import math
    from score import clean_answer
    try:
        with open(path, encoding="utf-8-sig") as f:   # a byte-order mark is allowed
            records = json.load(f)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable JSON file of released pairs ({type(e).__name__}: {e})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, found a {type(records).__name__}")
    root = os.path.realpath(images_dir)
    pairs, skipped, recovered = [], 0, 0
    for n, r in enumerate(records):
        try:
            prompt = r["conversations"][0]["value"].replace("<image>", "").strip()
            chosen, rejected = r["conversations"][1]["value"].strip(), r["rejected_conversations"][1]["value"].strip()
        except (KeyError, IndexError, TypeError, AttributeError):
            log(f"{path} record {n}: no conversations/rejected_conversations, skipped")
            skipped += 1
            continue
        where = f"{path} record {n} (id {r.get('id')})"
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
        outside = [p for p in (image, rejected_image) if p and os.path.commonpath([root, os.path.realpath(p)]) != root]
        missing = [p for p in (image, rejected_image) if p and not readable_image(p)]
        if outside or missing or not prompt or not chosen or not rejected:
            log(f"{where}: " + (f"image {outside[0]} is outside --images {images_dir}" if outside else
                                f"image {missing[0]} not found or unreadable" if missing else "empty text") + ", skipped")
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


def export_pairs(pairs, path):
    """Our pairs in the layout other DPO tools read: {prompt, chosen, rejected, images} per line
    (prompt with the <image> placeholder), plus rejected_images and weight for tools that use them."""
    write_jsonl(path, [{"prompt": "<image>\n" + p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
                        "images": [p["image"]], "rejected_images": [p["rejected_image"] or p["image"]],
                        "weight": p.get("weight")} for p in pairs])


# -----------------------------------------------------------------------------
# preference pairs as JSONL


def unwritable(path, is_folder):
    """Why `path` (a folder, or a file) cannot be written, or None: checked before any work is done."""
    if os.path.exists(path):
        if is_folder != os.path.isdir(path):
            return "exists and is not a folder" if is_folder else "is a folder"
        return None if os.access(path, os.W_OK) else "is not writable"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, so nothing can be created under it"
    return None if os.access(parent, os.W_OK) else f"{parent} is not writable"


def write_jsonl(path, records):
    """Write records atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


_READABLE = {}  # path -> bool, so each image file is opened once per process


def readable_image(path):
    """True if `path` is an image file PIL can read."""
    if path not in _READABLE:
        from PIL import Image
        try:
            with Image.open(path) as im:
                im.verify()
            _READABLE[path] = True
        except Exception:
            _READABLE[path] = False
    return _READABLE[path]


def read_pairs(path, log=print):
    """Pairs (or triplets) from JSONL. A line that is not UTF-8, not JSON or not an object, a record
    without prompt/chosen/rejected text, or one whose image or rejected image is missing or
    unreadable, is reported with file:line, skipped and counted; a missing or non-finite score becomes
    None (the neutral weight). A weight that is present but not a finite number >= 0 is an input error
    (ValueError with file:line): a silently changed weight would change training.
    returns (pairs, n_skipped)."""
    import math
    from score import read_jsonl
    bad = []
    lines = read_jsonl(path, lambda msg: (bad.append(msg), log(msg)))
    pairs, skipped = [], len(bad)
    for n, p in lines:
        missing = [k for k in ("prompt", "chosen", "rejected", "image") if not isinstance(p.get(k), str) or not p[k].strip()]
        if missing:
            log(f"{path}:{n}: skipped, empty or missing {missing}")
            skipped += 1
            continue
        images = [im for im in (p["image"], p.get("rejected_image"), p.get("corrupted_image")) if im and not readable_image(im)]
        if images:
            log(f"{path}:{n}: skipped, image {images[0]} is missing or unreadable")
            skipped += 1
            continue
        w = p.get("weight")
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0):
            raise ValueError(f"{path}:{n}: weight {w!r} is not a finite number >= 0 (record {p.get('id')})")
        s = p.get("score")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            if p.get("source") not in ("visual", "hscr", "fire") or s is not None:
                log(f"{path}:{n}: no usable score ({s!r}); it gets the neutral weight")
            p["score"] = None
        pairs.append(p)
    return pairs, skipped


# -----------------------------------------------------------------------------
# collation: (image, prompt, response) rows -> one batch

def encode_rows(processor, rows, prompt_format="plain", max_length=None, stats=None):
    """Tokenize rows of (image, question, response) for one forward pass.

    images: PIL images (one per row; rows may share or differ, e.g. chosen vs noised rejected).
    The prompt goes through the processor (which expands <image> into the image tokens); the
    response is tokenized alone, followed by EOS, and concatenated. Labels are the response
    tokens; prompt, image and padding positions are IGNORE_INDEX. Right padding.
    If prompt + response exceed `max_length`, question tokens are dropped from the middle of the
    prompt (never image tokens) and counted in `stats["truncated"]`; if that is not enough, the
    response is cut at its end and counted in `stats["response_truncated"]`.
    returns {input_ids, attention_mask, labels: (N, T) long, pixel_values: (N, 3, H, W)}."""
    tok = processor.tokenizer
    check_prompt_format(prompt_format, processor)
    prompts = [format_prompt(processor, prompt_format, q) for _, q, _ in rows]
    enc = processor(images=[im for im, _, _ in rows], text=prompts, return_tensors="pt", padding=True)
    image_token_id = tok.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
    seqs, labels = [], []
    for i, (_, _, response) in enumerate(rows):
        prompt_ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        response_ids = tok(" " + response.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if max_length and len(prompt_ids) + len(response_ids) > max_length:
            excess = len(prompt_ids) + len(response_ids) - max_length
            droppable = [j for j in range(1, len(prompt_ids) - 4) if prompt_ids[j] != image_token_id]
            drop = set(droppable[max(0, len(droppable) - excess):])
            prompt_ids = [t for j, t in enumerate(prompt_ids) if j not in drop]
            if stats is not None:
                stats["truncated"] = stats.get("truncated", 0) + 1
            room = max_length - len(prompt_ids)
            if room < 1:
                raise ValueError(f"row {i}: the image tokens alone exceed max_length={max_length}")
            if len(response_ids) > room:  # the response is cut at the end, as the prompt could not give more
                response_ids = response_ids[:room]
                if stats is not None:
                    stats["response_truncated"] = stats.get("response_truncated", 0) + 1
        seqs.append(prompt_ids + response_ids)
        labels.append([IGNORE_INDEX] * len(prompt_ids) + response_ids)
    T = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    label_t = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        input_ids[i, :len(s)], label_t[i, :len(l)], attention[i, :len(s)] = torch.tensor(s), torch.tensor(l), 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": label_t,
            "pixel_values": enc["pixel_values"]}


# -----------------------------------------------------------------------------
# building the two kinds of preference pairs

def build_text_pairs(items, samples, judge, image_path, seed=0, log=print):
    """Strategy 1 (text dispreference D_t). items: [{id, image_id, question, answer}], samples: the
    target model's N sampled answers per item. The judge picks the sample that most clearly
    contradicts the ground truth; if none does, it writes a believable hallucination. Samples that
    carry leaked prompt scaffolding are dropped and counted. returns pairs (score filled in later)."""
    from score import clean_answer, select_dispreferred, words, write_hallucination
    pairs, leaked, selected = [], 0, 0
    for i, (it, cands) in enumerate(zip(items, samples)):
        cleaned = [clean_answer(c) for c in cands]
        leaked += sum(c is None for c in cleaned)
        cands = [c for c in cleaned if c and words(c) != words(it["answer"])]
        choice = select_dispreferred(judge, it["question"], it["answer"], cands) if cands else None
        if choice is not None:
            rejected, how = cands[choice], f"sampled from the target model, selected by {judge.name}"
            selected += 1
        else:
            rejected, how = write_hallucination(judge, it["question"], it["answer"], seed + i)
        pairs.append({"id": f"text-{it['id']}", "source": "text", "image": image_path(it["image_id"]),
                      "rejected_image": None, "prompt": it["question"], "chosen": it["answer"],
                      "rejected": rejected, "score": None, "weight": None, "provenance": how})
    log(f"text pairs: {len(pairs)} ({selected} with a sampled answer, {len(pairs) - selected} injected,"
        f" {leaked} leaked samples dropped)")
    return pairs


def lesion_heatmap(item, store, heatmap="detector", log=print):
    """Where the lesion of an item's image is: (heatmap (H, W) in [0, 1], confidence), or (None, reason).
    heatmap: detector (noise.detect_lesions; its confidence), mask (ground-truth masks or boxes, widened
    by a soft margin; the confidence is the lesion's contrast with its surroundings, noise.mask_confidence),
    or a callable item -> (heatmap, confidence) such as `attention_tool`."""
    from noise import detect_lesions, heatmap_from_mask, mask_confidence, smooth_heatmap
    x = torch.as_tensor(store.pixels(item["image_id"]))                     # (H, W) in [0, 1]
    if callable(heatmap):
        return heatmap(item)
    if heatmap == "detector":
        return detect_lesions(x)
    if heatmap != "mask":
        raise ValueError(f"unknown heatmap source {heatmap!r} (detector, mask, or a callable)")
    try:
        m = store.mask(item["image_id"])
    except ValueError as e:
        log(f"  {e}; skipped")
        return None, "mask does not fit"
    if m is None:
        return None, "no mask"
    h = heatmap_from_mask(m)
    if h.sum() > 0:  # 1 inside the mask, a soft margin outside it
        h = torch.maximum(h, smooth_heatmap(h, sigma=max(0.5, 0.02 * h.shape[0])))
    return h, mask_confidence(x, m)


def write_noised(x, h, k, generator, name, out_dir):
    """x* = localized_noise(x, h) and the heatmap, as PNGs under out_dir/noised and out_dir/heatmaps.
    returns (noised path, heatmap path)."""
    from noise import localized_noise
    noised = localized_noise(x[None, None], h[None].float(), k=k, generator=generator)[0, 0]
    paths = [os.path.join(out_dir, sub, name + ".png") for sub in ("noised", "heatmaps")]
    for path, image in zip(paths, (noised, h)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_png(to_pil(image), path)
        _READABLE.pop(path, None)
    return paths


def lesion_mask(store, image_id):
    """The image's true lesion mask when the data has one (synthetic images; SLAKE's masks), else None."""
    try:
        return store.mask(image_id) if store.has_lesion(image_id) or isinstance(store, SyntheticStore) else None
    except ValueError:
        return None


def build_visual_pairs(items, store, out_dir, heatmap="detector", noise="local", k=500, seed=0, log=print):
    """Strategy 2 (visual dispreference D_v): the same answer given to an image whose lesion is noised.
    store: SyntheticStore or FileStore (pixels, mask, path); heatmap: see `lesion_heatmap`; noise:
    local, or global (h = 1). The pair's clinical-relevance score is how much of the true lesion the
    noise covers where the data has lesion masks (synthetic, SLAKE: a pair whose noise hides no lesion
    is no hard negative), else the visual tool's confidence (for ground-truth mask heatmaps: the
    lesion's contrast). Items with an empty heatmap (nothing to
    noise), no mask, or a mask that does not fit their image are skipped and counted. Noised images and
    heatmaps are PNGs under out_dir."""
    from collections import Counter
    from noise import lesion_coverage
    gen = torch.Generator().manual_seed(seed)
    pairs, skipped = [], Counter()
    for it in items:
        x = torch.as_tensor(store.pixels(it["image_id"]))
        h, confidence = lesion_heatmap(it, store, heatmap, log)
        if h is None:
            skipped[confidence] += 1
            continue
        if noise == "global":
            h = torch.ones_like(x)
        if float(h.sum()) == 0:
            skipped["empty heatmap"] += 1
            continue
        pid = f"visual-{it['id']}"
        noised_path, heatmap_path = write_noised(x, h, k, gen, pid, out_dir)
        truth = None if heatmap == "mask" else lesion_mask(store, it["image_id"])  # a mask covers itself: use its contrast
        relevance = lesion_coverage(h, truth) if truth is not None else float(confidence)
        pairs.append({"id": pid, "source": "visual", "image": store.path(it["image_id"]),
                      "rejected_image": noised_path, "heatmap": heatmap_path, "prompt": it["question"], "chosen": it["answer"],
                      "rejected": it["answer"], "score": relevance, "weight": None,
                      "provenance": f"{noise} noise at k={k}, heatmap {getattr(heatmap, '__name__', heatmap)}, score: " +
                                    ("the noise's coverage of the true lesion" if truth is not None else "tool confidence")})
    log(f"visual pairs: {len(pairs)}" + (" (skipped: " + ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())) + ")"
                                         if skipped else ""))
    return pairs

# -----------------------------------------------------------------------------
# the target model at work for pair building: generation, its own attention, HSCR's contrastive decoding

def generate_answers(model, processor, rows, prompt_format="plain", batch_size=64, max_new_tokens=16,
                     do_sample=False, temperature=1.0, num_return_sequences=1, generator_seed=None, log=None):
    """Answers for rows of (PIL image, question): greedy by default, or `num_return_sequences` samples.
    Generation stops at EOS or after `max_new_tokens`; how many hit that cap is printed (a capped
    answer is a fragment: raise the cap if it is more than a few).
    returns a list (one per row) of strings, or of lists of strings when sampling several."""
    check_prompt_format(prompt_format, processor)
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"  # generation continues from the right end
    device = next(model.parameters()).device
    out, t0, capped = [], time.time(), 0
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            enc = processor(images=[im for im, _ in chunk], text=[format_prompt(processor, prompt_format, q) for _, q in chunk],
                            return_tensors="pt", padding=True).to(device)
            if "pixel_values" in enc:
                enc["pixel_values"] = enc["pixel_values"].to(next(model.parameters()).dtype)
            with torch.no_grad():
                gen = model.generate(**enc, do_sample=do_sample, temperature=temperature if do_sample else None,
                                     top_p=None, top_k=None, max_new_tokens=max_new_tokens,
                                     num_return_sequences=num_return_sequences,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new_tokens = gen[:, enc["input_ids"].shape[1]:]
            capped += int(((new_tokens == tok.eos_token_id).sum(1) == 0).sum()) if new_tokens.shape[1] >= max_new_tokens else 0
            texts = [t.strip() for t in tok.batch_decode(new_tokens, skip_special_tokens=True)]
            if num_return_sequences == 1:
                out += texts
            else:
                out += [texts[j:j + num_return_sequences] for j in range(0, len(texts), num_return_sequences)]
            if log and (i // batch_size) % 10 == 9:
                done = min(i + batch_size, len(rows))
                rate = done / (time.time() - t0)
                log(f"  generated {done}/{len(rows)} | {rate:.0f} prompts/s | ETA {(len(rows) - done) / rate:.0f}s")
    finally:
        tok.padding_side = side
        model.train(was_training)
    if log:
        n = len(rows) * num_return_sequences
        log(f"  {capped} of {n} generations hit the cap of {max_new_tokens} new tokens" +
            (" (raise --max-new-tokens if that is more than a few)" if capped else ""))
    return out

def attention_tool(model, processor, fmt, pixels_of, device, layers=2):
    """The target model as its own visual tool: item -> (heatmap, confidence) from the attention of
    the answer tokens to the image tokens in the last `layers` language-model layers."""
    from noise import attention_heatmap
    image_token = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
    dtype = next(model.parameters()).dtype

    def model_attention(item):
        pixels = pixels_of(item["image_id"])
        batch = encode_rows(processor, [(to_pil(pixels), item["question"], item["answer"])], fmt)
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")  # fused attention kernels do not return the weights
        try:
            with torch.no_grad():
                inputs = {k: v.to(device, dtype=dtype if v.is_floating_point() else None)
                          for k, v in batch.items() if k != "labels"}
                out = model(**inputs, output_attentions=True)
        finally:
            model.set_attn_implementation(previous)
        stacked = torch.stack([a[0] for a in out.attentions[-layers:]]).float().cpu()  # (layers, heads, T, T)
        return attention_heatmap(stacked, batch["input_ids"][0] == image_token,
                                 batch["labels"][0] != IGNORE_INDEX, np.asarray(pixels).shape)
    return model_attention

def prompt_batch(processor, rows, prompt_format):
    """Encoded prompts (no response) of (PIL image, question) rows: input_ids as lists without padding,
    and pixel_values (N, 3, H, W)."""
    enc = processor(images=[im for im, _ in rows], text=[format_prompt(processor, prompt_format, q) for _, q in rows],
                    return_tensors="pt", padding=True)
    ids = [enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist() for i in range(len(rows))]
    return ids, enc["pixel_values"]


def visual_token_dropout(attention_mask, image_positions, p, generator=None):
    """D_p(v) of HSCR: hide a fraction p of each row's image-token positions from attention.

    attention_mask: (N, T) 0/1; image_positions: (N, T) bool. Exactly round(p * n_image) positions of
    each row, drawn with `generator`, are set to 0; text and padding positions are left as they are.
    returns a new (N, T) mask."""
    out = attention_mask.clone()
    for i in range(out.shape[0]):
        where = image_positions[i].nonzero().flatten()
        k = int(round(p * len(where)))
        if k:
            out[i, where[torch.randperm(len(where), generator=generator)[:k]]] = 0
    return out


def decode_with_replacement(next_logits, n_rows, coupled, max_new_tokens, eos_id):
    """Greedy decoding of `n_rows` answers with the full image, except at the steps in coupled[i]
    (0-based step indices of row i), where the image-blind argmax is emitted instead when it differs.

    next_logits(rows, prefixes) -> (full (len(rows), V), dropped (len(rows), V)): next-token logits of
    the given rows' answer prefixes (lists of token ids) with the full and the dropped image.
    returns (answers: token-id lists without EOS, shifts: per row the KL shift of every step taken,
    the EOS step included)."""
    from mmedpo import hscr_step_scores
    answers, shifts, active = [[] for _ in range(n_rows)], [[] for _ in range(n_rows)], list(range(n_rows))
    for t in range(max_new_tokens):
        if not active:
            break
        full, dropped = next_logits(active, [answers[i] for i in active])
        greedy, blind = full.argmax(-1), dropped.argmax(-1)
        shift, _ = hscr_step_scores(full, dropped, greedy)
        still = []
        for j, i in enumerate(active):
            token = int(blind[j]) if t in coupled[i] else int(greedy[j])
            shifts[i].append(float(shift[j]))
            if token == eos_id:
                continue
            answers[i].append(token)
            still.append(i)
        active = still
    return answers, shifts


def hscr_levels(shifts, n):
    """The coupled steps of the two dispreference levels (our reading): the n2 = min(n, steps) steps
    of largest shift for y_l2, the top n1 = n2 // 2 of them for y_l1 (none when n2 < 2)."""
    order = sorted(range(len(shifts)), key=lambda t: -shifts[t])
    n2 = min(n, len(shifts))
    n1 = n2 // 2
    return set(order[:n1]), set(order[:n2])


def build_hscr_triplets(model, processor, items, image_of, image_path, prompt_format="plain", p=0.7, n=10,
                        max_new_tokens=12, seed=0, batch_size=64, log=print):
    """HSCR's dispreferred answers (our reading of arXiv 2506.00805): the model's greedy answer with
    the full image gives the per-step shift KL(pi(.|v) || pi(.|D_p(v))); decoding again while the
    top-n1 (y_l1) or top-n2 (y_l2) most image-coupled steps take the image-blind argmax gives two
    levels of worse answers. y_w is the ground truth. A triplet is dropped (and counted) when y_w
    coincides with y_l1 or y_l2: it holds no preference. One where y_l1 = y_l2 is kept and counted: on a
    one-word answer ("yes") there is no second, worse level, the implicit term is then a constant and
    the triplet trains as one DPO pair counted twice.
    returns records {id, source: hscr, image, prompt, chosen, rejected, rejected2, ...}."""
    from score import words
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
    gen = torch.Generator().manual_seed(seed)
    triplets, same, one_level, t0 = [], 0, 0, time.time()
    was_training = model.training
    model.eval()
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        prompts, pixels = prompt_batch(processor, [(image_of(it), it["question"]) for it in chunk], prompt_format)
        blind_keep = []  # per row: the attention mask of its prompt under D_p(v), fixed for all its steps
        for ids in prompts:
            t = torch.tensor([ids])
            blind_keep.append(visual_token_dropout(torch.ones_like(t), t == image_token_id, p, gen)[0])

        def next_logits(rows, prefixes):
            seqs = [prompts[i] + prefix for i, prefix in zip(rows, prefixes)]
            T = max(len(s) for s in seqs)
            ids = torch.full((2 * len(rows), T), tok.pad_token_id, dtype=torch.long)
            att = torch.zeros((2 * len(rows), T), dtype=torch.long)
            for j, (i, s) in enumerate(zip(rows, seqs)):
                for r in (j, j + len(rows)):  # full image rows, then dropped-image rows
                    ids[r, :len(s)], att[r, :len(s)] = torch.tensor(s), 1
                att[j + len(rows), :len(prompts[i])] = blind_keep[i]
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), attention_mask=att.to(device),
                               pixel_values=pixels[rows + rows].to(device, dtype)).logits
            last = torch.tensor([len(s) - 1 for s in seqs] * 2, device=device)
            out = logits[torch.arange(len(last), device=device), last].float().cpu()
            return out[:len(rows)], out[len(rows):]

        none = [set() for _ in chunk]
        answers, shifts = decode_with_replacement(next_logits, len(chunk), none, max_new_tokens, tok.eos_token_id)
        levels = [hscr_levels(s, n) for s in shifts]
        l1, _ = decode_with_replacement(next_logits, len(chunk), [a for a, _ in levels], max_new_tokens, tok.eos_token_id)
        l2, _ = decode_with_replacement(next_logits, len(chunk), [b for _, b in levels], max_new_tokens, tok.eos_token_id)
        for it, y, y1, y2 in zip(chunk, answers, l1, l2):
            y, y1, y2 = (tok.decode(a, skip_special_tokens=True).strip() for a in (y, y1, y2))
            chosen = y if words(y) == words(it["answer"]) else it["answer"]
            if words(chosen) in (words(y1), words(y2)):
                same += 1
                continue
            one_level += words(y1) == words(y2)
            triplets.append({"id": f"hscr-{it['id']}", "source": "hscr", "image": image_path(it["image_id"]),
                             "rejected_image": None, "prompt": it["question"], "chosen": chosen, "rejected": y1,
                             "rejected2": y2, "score": None, "weight": None,
                             "provenance": f"HSCR decoding, greedy answer {y!r}, p={p}, n={n}"})
        if log and (start // batch_size) % 4 == 3:
            done = start + len(chunk)
            log(f"  HSCR {done}/{len(items)} | {done / (time.time() - t0):.0f} questions/s")
    model.train(was_training)
    log(f"HSCR triplets: {len(triplets)} of {len(items)} questions ({same} dropped: y_w equals a dispreferred answer; "
        f"{one_level} kept with y_l1 = y_l2)")
    return triplets


# -----------------------------------------------------------------------------
# pair building for each objective, in one place

def heatmap_tool(name, model=None, processor=None, prompt_format="plain", store=None, device=None):
    """Where the lesion is, for Strategy 2: 'detector' (noise.detect_lesions), 'mask' (ground-truth
    masks or boxes), or 'attention' (the target model's own attention, as a callable)."""
    if name == "attention":
        return attention_tool(model, processor, prompt_format, store.pixels, device)
    return name


def build_mmedpo_pairs(model, processor, cfg, train_qa, store, pairs_dir, device, log=print):
    """Strategy 1 (text) and Strategy 2 (visual) pairs with their clinical-relevance scores.
    cfg holds the pair settings (train.py's flags). returns (pairs, complete): complete is False when
    a judge failed on some pair, so that the stage is not marked done with neutral weights."""
    import score
    rng = random.Random(cfg.seed)
    judges = [score.parse_judge(j) for j in cfg.judge] or [score.RuleJudge()]
    selector = score.parse_judge(cfg.selector) if cfg.selector else judges[0]
    strategies, pairs, complete = cfg.strategies.split(","), [], True
    image_of = lambda it: image_for_model(store.pil(it["image_id"]), cfg.pad_to_square)
    if "text" in strategies:
        items = rng.sample(train_qa, min(cfg.n_text, len(train_qa)))
        log(f"Strategy 1: sampling {cfg.samples} answers for {len(items)} questions (temperature {cfg.temperature})")
        samples = generate_answers(model, processor, [(image_of(it), it["question"]) for it in items], cfg.prompt_format,
                                   batch_size=128, do_sample=True, temperature=cfg.temperature,
                                   num_return_sequences=cfg.samples, generator_seed=cfg.seed,
                                   max_new_tokens=cfg.sample_max_new_tokens, log=log)
        samples = [[s] for s in samples] if cfg.samples == 1 else samples
        text = build_text_pairs(items, samples, selector, store.path, cfg.seed, log)
        if cfg.weighting != "none":
            results = score.score_pairs(text, judges, os.path.join(pairs_dir, "judge_cache.jsonl"), cfg.workers,
                                        cfg.rounds, log)
            for p, r in zip(text, results):
                p["score"] = r["score"]
                p["provenance"] += f"; score {r['status']} by {'consensus' if r['consensus'] else 'mean'} of " \
                                   f"{[h['judge'] for h in r['history']]}"
            complete = not any(r["status"] == "failed" for r in results)
        pairs += text
    if "visual" in strategies:
        candidates = [it for it in train_qa if cfg.heatmap != "mask" or store.has_lesion(it["image_id"])]
        items = rng.sample(candidates, min(cfg.n_visual, len(candidates)))
        log(f"Strategy 2: {cfg.noise} noise at k={cfg.noise_step} on {len(items)} images, heatmap {cfg.heatmap}")
        tool = heatmap_tool(cfg.heatmap, model, processor, cfg.prompt_format, store, device)
        pairs += build_visual_pairs(items, store, pairs_dir, tool, cfg.noise, cfg.noise_step, cfg.seed, log)
    return assign_weights(pairs, cfg.weighting, log), complete


def build_hscr_pairs(model, processor, cfg, train_qa, store, pairs_dir, device, log=print):
    """HSCR triplets for --n-text training questions (weights 1). returns (triplets, True)."""
    items = random.Random(cfg.seed).sample(train_qa, min(cfg.n_text, len(train_qa)))
    log(f"HSCR: contrastive decoding on {len(items)} questions (p={cfg.hscr_p}, n={cfg.hscr_n})")
    image_of = lambda it: image_for_model(store.pil(it["image_id"]), cfg.pad_to_square)
    triplets = build_hscr_triplets(model, processor, items, image_of, store.path, cfg.prompt_format, cfg.hscr_p,
                                   cfg.hscr_n, cfg.sample_max_new_tokens, cfg.seed, log=log)
    return assign_weights(triplets, "none"), True


def edit_masks(tokens_w, tokens_l):
    """FiRe-MPO's token masks from a diff of two token sequences (difflib.SequenceMatcher): m_w marks the
    tokens of y_w that the edit replaced or inserted, m_l those of y_l it replaced or deleted.
    ["left", "lung", "nodule"] -> ["right", "lung", "nodule"] gives [1, 0, 0] on both sides."""
    import difflib
    m_w, m_l = [0] * len(tokens_w), [0] * len(tokens_l)
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, list(tokens_l), list(tokens_w), autojunk=False).get_opcodes():
        if tag in ("replace", "delete"):
            m_l[i1:i2] = [1] * (i2 - i1)
        if tag in ("replace", "insert"):
            m_w[j1:j2] = [1] * (j2 - j1)
    return m_w, m_l


def response_tokens(tokenizer, text):
    """The response's token ids as encode_rows puts them in a batch (without the closing EOS)."""
    return tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"]


def build_fire_pairs(model, processor, cfg, train_qa, store, pairs_dir, device, log=print, round_index=0):
    """FiRe-MPO's records (our reading of arXiv 2606.12590): the current policy answers --n-text
    training questions greedily (y_l); an editor that knows the ground truth corrects only the wrong
    spans (y_w, `score.edit_answers`: the rule editor by default, an LLM with --editor); the token
    masks come from the diff; the clean image's lesion is noised for the visual term (x*, as in
    Strategy 2; global noise where the tool sees no lesion). Answers already right give no record and
    are counted, as are answers with leaked scaffolding. returns (records, complete)."""
    import score
    items = random.Random(f"{cfg.seed}-{round_index}").sample(train_qa, min(cfg.n_text, len(train_qa)))
    image_of = lambda it: image_for_model(store.pil(it["image_id"]), cfg.pad_to_square)
    log(f"FiRe-MPO round {round_index}: the policy answers {len(items)} questions; the editor corrects them")
    answers = generate_answers(model, processor, [(image_of(it), it["question"]) for it in items], cfg.prompt_format,
                               batch_size=128, max_new_tokens=cfg.sample_max_new_tokens, log=log)
    editor = score.parse_judge(cfg.editor) if cfg.editor else score.RuleJudge()
    cleaned = [score.clean_answer(a) or "" for a in answers]
    edits = score.edit_answers(items, cleaned, editor, os.path.join(pairs_dir, "edit_cache.jsonl"), cfg.workers, log)
    tool = heatmap_tool(cfg.heatmap, model, processor, cfg.prompt_format, store, device)
    gen, records, counts = torch.Generator().manual_seed(cfg.seed + round_index), [], {"right": 0, "leaked": 0, "failed": 0}
    for it, answer, y_l, e in zip(items, answers, cleaned, edits):
        if not y_l and answer.strip():
            counts["leaked"] += 1
            continue
        if e["status"] != "edited":
            counts[e["status"]] += 1
            continue
        y_w = e["edited"]
        m_w, m_l = edit_masks(response_tokens(processor.tokenizer, y_w), response_tokens(processor.tokenizer, y_l))
        x = torch.as_tensor(store.pixels(it["image_id"]))
        h, _ = lesion_heatmap(it, store, tool, log)
        h = torch.ones_like(x) if h is None or cfg.noise == "global" or float(h.sum()) == 0 else h
        rid = f"fire-{it['id']}"
        corrupted, heatmap_path = write_noised(x, h, cfg.noise_step, gen, f"{rid}-r{round_index}", pairs_dir)
        records.append({"id": rid, "source": "fire", "image": store.path(it["image_id"]), "rejected_image": None,
                        "corrupted_image": corrupted, "heatmap": heatmap_path, "prompt": it["question"],
                        "chosen": y_w, "rejected": y_l, "mask_chosen": m_w, "mask_rejected": m_l,
                        "score": None, "weight": None, "provenance": f"round {round_index}, {e['how']}"})
    log(f"FiRe-MPO records: {len(records)} edited answers ({counts['right']} already right, {counts['leaked']} "
        f"with leaked scaffolding, {counts['failed']} editor failures)")
    return assign_weights(records, "none"), counts["failed"] == 0


def image_for_model(image, pad):
    """The PIL image as the model sees it: LLaVA pads to a square with the mean colour when asked."""
    return pad_to_square(image) if pad else image


# -----------------------------------------------------------------------------
# training batches: every record tokenised once, k responses per record

def record_rows(record):
    """The (image path, response) rows of one record, in the objective's order: chosen, rejected
    (on the noised image for a visual pair), then for HSCR the second rejected answer, for FiRe-MPO
    the chosen answer again on the lesion-corrupted image."""
    rows = [(record["image"], record["chosen"]), (record.get("rejected_image") or record["image"], record["rejected"])]
    if record.get("rejected2") is not None:
        rows.append((record["image"], record["rejected2"]))
    if record.get("corrupted_image") is not None:
        rows.append((record["corrupted_image"], record["chosen"]))
    return rows


class RecordDataset(torch.utils.data.Dataset):
    """Records (pairs or triplets) as encoded rows. Each record is tokenised on first use and kept,
    so that a step is model compute only; pixel values are kept too when `cache_pixels` (the tiny
    default), else computed again each time (real datasets; DataLoader workers prefetch them).
    item i -> list of k row dicts {input_ids (T,), labels (T,), pixel_values (3, H, W)}."""

    def __init__(self, records, processor, load_image, prompt_format="plain", max_length=None, stats=None,
                 cache_pixels=True):
        self.records, self.processor, self.load_image = records, processor, load_image
        self.prompt_format, self.max_length, self.stats, self.cache_pixels = prompt_format, max_length, stats, cache_pixels
        self.cache = {}

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        if i in self.cache:
            return self.cache[i]
        record, rows = self.records[i], []
        edits = [record.get("mask_chosen"), record.get("mask_rejected"), record.get("mask_chosen")]
        for j, (path, response) in enumerate(record_rows(record)):
            enc = encode_rows(self.processor, [(self.load_image(path), record["prompt"], response)],
                              self.prompt_format, self.max_length, self.stats)
            row = {k: v[0] for k, v in enc.items()}
            if record.get("mask_chosen") is not None:  # FiRe-MPO: the edited tokens, at their label positions
                where = (row["labels"] != IGNORE_INDEX).nonzero().flatten()
                row["edit_mask"] = torch.zeros(len(row["labels"]))
                n = min(len(edits[j]), len(where))  # the response may have been cut to fit max_length
                row["edit_mask"][where[:n]] = torch.tensor(edits[j][:n], dtype=torch.float32)
            rows.append(row)
        if self.cache_pixels:
            self.cache[i] = rows
        return rows


def collate_records(batch, pad_id):
    """A list of B records of k rows each -> one batch of k*B rows, response-major (every chosen row,
    then every rejected row, ...), right-padded: {input_ids, attention_mask, labels (kB, T), pixel_values}
    and, for FiRe-MPO records, edit_mask (kB, T)."""
    rows = [rec[j] for j in range(len(batch[0])) for rec in batch]
    T = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n], labels[i, :n], attention[i, :n] = r["input_ids"], r["labels"], 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
             "pixel_values": torch.stack([r["pixel_values"] for r in rows])}
    if "edit_mask" in rows[0]:
        batch["edit_mask"] = torch.zeros((len(rows), T))
        for i, r in enumerate(rows):
            batch["edit_mask"][i, :len(r["edit_mask"])] = r["edit_mask"]
    return batch


WEIGHTINGS = ("z", "raw", "none")


def assign_weights(pairs, weighting="z", log=None):
    """Each pair's loss weight from its clinical-relevance score.
    z     the paper's Z(.) per source (text and visual scores live on different scales)
    raw   the score as it is (the authors' trainer on their released weighted_score, 0..1)
    none  every weight 1 (plain DPO)
    Unscored pairs get 1 (the neutral weight) under every choice. A source whose scores are all
    equal gets uniform weights under z; that is said out loud, since it switches CRS off for it."""
    from mmedpo import normalize_scores
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}: {', '.join(WEIGHTINGS)}")
    for p in pairs:
        p["weight"] = 1.0
    if weighting == "none":
        return pairs
    for source in sorted({p["source"] for p in pairs}):
        scored = [p for p in pairs if p["source"] == source and p["score"] is not None]
        if not scored:
            continue
        scores = [p["score"] for p in scored]
        weights = scores if weighting == "raw" else normalize_scores(scores).tolist()
        for p, w in zip(scored, weights):
            p["weight"] = float(w)
        if log and weighting == "z" and len(set(scores)) == 1 and len(scores) > 1:
            log(f"      WARNING: every {source} pair has the score {scores[0]}: their weights are all 1, "
                f"so clinical-relevance weighting does nothing for {source} pairs")
    return pairs


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "out/examples"
    os.makedirs(out, exist_ok=True)
    images, qa = make_synthetic(6, seed=0, size=128)
    for im in images:
        to_pil(im["pixels"]).save(os.path.join(out, im["image_id"] + ".png"))
        print(im["image_id"], "|", im["report"])
        for q in qa:
            if q["image_id"] == im["image_id"]:
                print(f"   [{q['type']:6s}] {q['question']} -> {q['answer']}")
    print(f"wrote {len(images)} images to {out}/")
