"""Data for MMedPO: synthetic radiographs (the offline default), preference pairs and their JSONL
files, and the collation that turns (image, prompt, response) rows into one model batch.

The synthetic set stands in for SLAKE / VQA-RAD: grayscale chest-like images (body, lung fields,
ribs, spine, heart) with 0-2 findings among six kinds placed in named zones, each with its
ground-truth mask, and closed (yes/no) and open questions whose answers are balanced so that the
text alone tells nothing: a model must look at the image to beat the answer prior.
Convention: radiological view, the patient's right lung is on the image's left.

    python data.py            # writes a few example images and their questions to out/examples/

Tests:  python -m pytest -q tests/test_data.py
"""
import json
import os
import random
import sys

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
    "mistral": "[INST] <image>\n{question} [/INST]",  # LLaVA-Med v1.5 (Mistral-7B)
}  # and "chat": the processor's own chat template, one user turn with an image and the question


def check_prompt_format(prompt_format, processor=None):
    """ValueError unless the format is 'chat' (with a processor that has a chat template) or a template
    holding both '<image>' and '{question}'."""
    if prompt_format == "chat":
        if processor is not None and not getattr(processor, "chat_template", None):
            raise ValueError("--prompt-format chat: the processor has no chat template; use plain, mistral or a template")
        return
    fmt = PROMPT_FORMATS.get(prompt_format, prompt_format)
    if "<image>" not in fmt or "{question}" not in fmt:
        raise ValueError(f"prompt format {fmt!r} needs both '<image>' and '{{question}}' (or: plain, mistral, chat)")


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


def make_questions(findings, rng):
    """Closed and open questions with balanced answers. Each: (question, answer, type, qtype)."""
    present = {f["kind"]: f for f in findings}
    lung = [f for f in findings if f["kind"] != "cardiomegaly"]
    qs = []
    # about 65 % of images have a lung finding: asking about one 77 % of the time balances yes/no
    kind = rng.choice(lung)["kind"] if lung and rng.random() < 0.77 else rng.choice(
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
    return qs


def make_synthetic(n_images, seed=0, size=32, split="train"):
    """Deterministic per (seed, split). returns (images, qa):
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
        for j, (q, a, t, qt) in enumerate(make_questions(findings, rng)):
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
    """A grayscale image as (H, W) float32 in [0, 1]; a missing or corrupt file raises ValueError naming it."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), np.float32) / 255.0
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


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
        path = os.path.join(self.folder, image_id + ".png")
        if not os.path.exists(path):
            os.makedirs(self.folder, exist_ok=True)
            to_pil(self.pixels(image_id)).save(path)
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
# real datasets: SLAKE, VQA-RAD, IU-Xray; items as the synthetic ones, image_id = path under root

DOWNLOAD_HINTS = {
    "slake": "SLAKE (https://www.med-vqa.com/slake/): the folder holding train.json, test.json and imgs/",
    "vqa-rad": "VQA-RAD (https://osf.io/89kps/): the folder holding 'VQA_RAD Dataset Public.json' and "
               "'VQA_RAD Image Folder/'",
    "iu-xray": "IU-Xray as prepared by R2Gen: the folder holding annotation.json and images/",
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


def load_iu_xray(root, split="train", log=print):
    """IU-Xray report generation (R2Gen's annotation.json): one item per study, first image, the report
    as the answer, a prompt paraphrasing 'Describe the following image in detail.'"""
    from collections import Counter
    with open(_need(os.path.join(root, "annotation.json"), "iu-xray")) as f:
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
        items.append({"id": f"iu-{r.get('id', n)}", "image_id": os.path.join("images", paths[0]),
                      "question": REPORT_PROMPTS[n % len(REPORT_PROMPTS)], "answer": report, "type": "report",
                      "qtype": "report"})
    _report(f"IU-Xray {split}", len(items), skipped, log)
    return items, FileStore(root)


LOADERS = {"slake": load_slake, "vqa-rad": load_vqa_rad, "iu-xray": load_iu_xray}


def read_released_pairs(path, images_dir, log=print):
    """The released MMedPO preference files ({id, image, conversations, rejected_conversations,
    weighted_score[, rejected_image]}) as this project's pairs; weighted_score becomes the raw score.
    Records with leaked prompt scaffolding, a missing image or an empty answer are reported and skipped.
    returns (pairs, skipped count)."""
    from score import clean_answer
    with open(path) as f:
        records = json.load(f)
    pairs, skipped = [], 0
    for n, r in enumerate(records):
        try:
            prompt = r["conversations"][0]["value"].replace("<image>", "").strip()
            chosen, rejected = r["conversations"][1]["value"].strip(), r["rejected_conversations"][1]["value"].strip()
        except (KeyError, IndexError, TypeError, AttributeError):
            log(f"{path} record {n}: no conversations/rejected_conversations, skipped")
            skipped += 1
            continue
        if clean_answer(chosen) is None or clean_answer(rejected) is None:
            log(f"{path} record {n} (id {r.get('id')}): leaked prompt scaffolding in an answer, skipped")
            skipped += 1
            continue
        image = os.path.join(images_dir, str(r.get("image", "")))
        rejected_image = os.path.join(images_dir, r["rejected_image"]) if r.get("rejected_image") else None
        missing = [p for p in (image, rejected_image) if p and not os.path.isfile(p)]
        if missing or not prompt or not chosen or not rejected:
            log(f"{path} record {n} (id {r.get('id')}): " + (f"image {missing[0]} not found" if missing else "empty text")
                + ", skipped")
            skipped += 1
            continue
        score = r.get("weighted_score")
        pairs.append({"id": f"released-{r.get('id', n)}", "source": "visual" if rejected_image else "text",
                      "image": image, "rejected_image": rejected_image, "prompt": prompt, "chosen": chosen,
                      "rejected": rejected, "score": float(score) if isinstance(score, (int, float)) else None,
                      "weight": None, "provenance": f"released file {os.path.basename(path)}"})
    log(f"{path}: {len(pairs)} pairs, {skipped} skipped")
    return pairs, skipped


def export_pairs(pairs, path):
    """Our pairs in the layout other DPO tools read: {prompt, chosen, rejected, images} per line
    (prompt with the <image> placeholder), plus rejected_images and weight for tools that use them."""
    write_jsonl(path, [{"prompt": "<image>\n" + p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
                        "images": [p["image"]], "rejected_images": [p["rejected_image"] or p["image"]],
                        "weight": p.get("weight")} for p in pairs])


# -----------------------------------------------------------------------------
# preference pairs as JSONL


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
    """Pairs from JSONL. A line that does not parse, a pair without prompt/chosen/rejected text, or one
    whose image or rejected image is missing or unreadable, is reported with file:line, skipped and
    counted; a missing score becomes None (it gets the neutral weight). returns (pairs, n_skipped)."""
    pairs, skipped = [], 0
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                p = json.loads(line)
            except ValueError as e:
                log(f"{path}:{n}: skipped, not JSON ({e})")
                skipped += 1
                continue
            missing = [k for k in ("prompt", "chosen", "rejected", "image") if not isinstance(p.get(k), str) or not p[k].strip()]
            if missing:
                log(f"{path}:{n}: skipped, empty or missing {missing}")
                skipped += 1
                continue
            bad = [im for im in (p["image"], p.get("rejected_image")) if im and not readable_image(im)]
            if bad:
                log(f"{path}:{n}: skipped, image {bad[0]} is missing or unreadable")
                skipped += 1
                continue
            if not isinstance(p.get("score"), (int, float)) or p["score"] != p["score"]:
                if p.get("source") != "visual" or p.get("score") is not None:
                    log(f"{path}:{n}: no usable score ({p.get('score')!r}); it gets the neutral weight")
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


def pair_rows(pairs, image_loader):
    """Chosen rows then rejected rows of a list of pairs: [(image, prompt, chosen)...] + [(image*, prompt,
    rejected)...], so that one forward gives both halves (chosen = first B, rejected = last B)."""
    chosen = [(image_loader(p["image"]), p["prompt"], p["chosen"]) for p in pairs]
    rejected = [(image_loader(p["rejected_image"] or p["image"]), p["prompt"], p["rejected"]) for p in pairs]
    return chosen + rejected


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


def build_visual_pairs(items, store, out_dir, heatmap="detector", noise="local", k=500, seed=0, log=print):
    """Strategy 2 (visual dispreference D_v): the same answer given to an image whose lesion is noised.
    store: SyntheticStore or FileStore (pixels, mask, path). heatmap: detector (noise.detect_lesions;
    its confidence is the score), mask (ground-truth masks or boxes, score 1), or a callable
    item -> (heatmap (H, W) in [0, 1], confidence). noise: local, or global (h = 1).
    Items with an empty heatmap (nothing to noise), no mask, or a mask that does not fit their image
    are skipped and counted. Noised images and heatmaps are written as PNG under out_dir."""
    from collections import Counter
    from noise import detect_lesions, heatmap_from_mask, localized_noise, smooth_heatmap
    os.makedirs(os.path.join(out_dir, "noised"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "heatmaps"), exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    pairs, skipped = [], Counter()
    for it in items:
        x = torch.as_tensor(store.pixels(it["image_id"]))                   # (H, W) in [0, 1]
        if callable(heatmap):
            h, confidence = heatmap(it)
        elif heatmap == "mask":
            try:
                m = store.mask(it["image_id"])
            except ValueError as e:
                log(f"  {e}; skipped")
                skipped["mask does not fit"] += 1
                continue
            if m is None:
                skipped["no mask"] += 1
                continue
            h, confidence = heatmap_from_mask(m), 1.0
            if h.sum() > 0:  # 1 inside the mask, a soft margin outside it
                h = torch.maximum(h, smooth_heatmap(h, sigma=max(0.5, 0.02 * h.shape[0])))
        elif heatmap == "detector":
            h, confidence = detect_lesions(x)
        else:
            raise ValueError(f"unknown heatmap source {heatmap!r} (detector, mask, or a callable)")
        if noise == "global":
            h = torch.ones_like(x)
        if float(h.sum()) == 0:
            skipped["empty heatmap"] += 1
            continue
        noised = localized_noise(x[None, None], h[None].float(), k=k, generator=gen)[0, 0]
        pid = f"visual-{it['id']}"
        noised_path = os.path.join(out_dir, "noised", pid + ".png")
        to_pil(noised).save(noised_path)
        to_pil(h).save(os.path.join(out_dir, "heatmaps", pid + ".png"))
        pairs.append({"id": pid, "source": "visual", "image": store.path(it["image_id"]),
                      "rejected_image": noised_path, "prompt": it["question"], "chosen": it["answer"],
                      "rejected": it["answer"], "score": float(confidence), "weight": None,
                      "provenance": f"{noise} noise at k={k}, heatmap {getattr(heatmap, '__name__', heatmap)}"})
    log(f"visual pairs: {len(pairs)}" + (" (skipped: " + ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())) + ")"
                                         if skipped else ""))
    return pairs


def assign_weights(pairs, crs=True):
    """Z(.) per source on the pairs that have a score; unscored pairs and --no-crs get weight 1 (mu)."""
    from mmedpo import normalize_scores
    for p in pairs:
        p["weight"] = 1.0
    if not crs:
        return pairs
    for source in sorted({p["source"] for p in pairs}):
        scored = [p for p in pairs if p["source"] == source and p["score"] is not None]
        if scored:
            for p, w in zip(scored, normalize_scores([p["score"] for p in scored]).tolist()):
                p["weight"] = w
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
