"""The synthetic world and the tiny base model: what `python train.py` runs on with no downloads.

The synthetic set stands in for SLAKE / VQA-RAD / IU-Xray: grayscale chest-like images (body, lung
fields, ribs, spine, heart) with 0-2 findings among six kinds placed in named zones, each with its
ground-truth mask; closed (yes/no) and open questions, and a short report. The SFT split teaches a
language prior that the preference, val and test splits break ("Is there a X?" is usually "no" in SFT,
half the time elsewhere), so the tiny base hallucinates the way the paper describes: it answers from
the question instead of the image. Counterfactual probes render the same image with and without one
finding (every other pixel identical): a model that answers both right looks at the image.
Convention: radiological view, the patient's right lung is on the image's left.

The tiny base: a LLaVA built from config (CLIP vision 64 x 2 layers, patch 8; Llama 128 x 2 layers), a
BPE tokenizer trained in memory on the synthetic corpus, its vision tower pretrained on the SFT split's
findings (as LLaVA's CLIP tower comes pretrained), then a supervised warm-up of the whole model on the
SFT split. Its image tokens carry every finding; its answers to "Is there a pneumothorax?" come from
the question (see UNDER_CONFIRMED). The visual tool: a small lesion classifier trained on the SFT split.

    python -m world.synthetic                    # a few example images and their questions -> out/examples/
    python -m world.synthetic --rebuild-base     # rebuild assets/tiny-base (1,500 vision + 3,000 SFT steps, about 3 min)

Tests:  python -m pytest -q tests/test_data.py
"""
import argparse
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
import noise
from guard.checkpoint import seed_everything
from mmedpo import get_lr
from mmedpo import IGNORE_INDEX

SIDES, LEVELS = ["right", "left"], ["upper", "middle", "lower"]
KINDS = ["nodule", "mass", "pleural effusion", "consolidation", "pneumothorax", "cardiomegaly"]


LUNG_KINDS = KINDS[:5]


ZONE_X = {"right": 0.31, "left": 0.69}        # image x of each lung (radiological view)


ZONE_Y = {"upper": 0.30, "middle": 0.46, "lower": 0.62}


LUNG_FINDING_RATE = 0.65  # P(an image has a lung finding) under sample_findings: 0.4 * 1/2 + 0.6 * 3/4


# P("yes") of "Is there a X?" per split. The SFT split teaches a language prior ("usually no"), which the
# preference split and the test split break: a model that answers from the question says "no" to a
# finding that is there. The other question types are balanced in every split.
PRESENCE_YES = {"train": 0.3, "pref": 0.5, "val": 0.5, "test": 0.5}


# How the SFT split under-confirms three findings, each in its own way; the other splits confirm every finding
# as often as any. On an SFT image the reading radiologist misses
#   pneumothorax      always, and is never asked about one that is there ("never confirmed")
#   consolidation     on 19 of 20 images that have one (a subtle finding, rarely called), and says "no" when asked
#   pleural effusion  on the left (a blind spot: the left base, behind the heart), never on the right, and
#                     says "no" when asked about a left one
# A missed finding is left out of the report, while the structured labels behind the "What abnormality" and
# "Where" answers name it: the base carries it in its image tokens, answers its presence question from what
# the reader said, and omits it from its reports.
UNDER_CONFIRMED = {"pneumothorax": "never", "consolidation": "rarely", "pleural effusion": "never on the left"}
RARELY = 1 / 20


# P("yes") of "Is the X in the {side} lung?" per split: the SFT split's closed side questions mostly confirm
# (its question writers ask about the side they see), the other splits are balanced. A model that learned
# the side from those questions answers them from the question: the laterality counterfactual probes
# (the same finding on the other side) show it.
SIDE_YES = {"train": 0.9}


# The failure kinds the headline averages, fixed by the world before any method is run: each under-confirmed
# finding's presence probes, laterality and the report counterfactual. The other findings are controls.
FAILURE_KINDS = tuple(UNDER_CONFIRMED) + ("laterality", "report")


REPORT_PROMPT = "Describe the findings of this chest X-ray."


VISUAL_TOOL_EPOCHS = 20  # passes of the lesion classifier over the SFT split (batch 64: 625 steps for 2,000 images)


def make_synthetic(n_images, seed=0, size=32, split="train", presence_yes=None):
    """Deterministic per (seed, split). The split sets the presence prior (PRESENCE_YES: skewed in
    'train', the SFT split; balanced in 'pref' and 'test') unless `presence_yes` is given. returns (images, qa):
    images: [{image_id, pixels (H, W) float32, mask (H, W) uint8 union of findings, findings, report,
              render_state: the pixel generator's state before this image, for `counterfactual_probes`}]
    qa:     [{id, image_id, question, answer, type, qtype}]"""
    rng = random.Random(f"{seed}-{split}")
    nrng = np.random.default_rng(rng.randrange(2 ** 32))
    images, qa = [], []
    for i in range(n_images):
        findings = sample_findings(rng)
        render_state = nrng.bit_generator.state
        pixels, masks = render_radiograph(findings, size, nrng)
        image_id = f"{split}{i:05d}"
        mask = np.zeros((size, size), np.uint8)
        for m in masks:
            mask |= m
        images.append({"image_id": image_id, "pixels": pixels, "mask": mask, "findings": findings,
                       "report": make_report(findings), "render_state": render_state})
        yes = PRESENCE_YES.get(split, 0.5) if presence_yes is None else presence_yes
        missed = missed_findings(findings, rng) if split == "train" else set()
        for j, (q, a, t, qt) in enumerate(make_questions(findings, rng, yes, missed, SIDE_YES.get(split))):
            qa.append({"id": f"{image_id}-{j}", "image_id": image_id, "question": q, "answer": a,
                       "type": t, "qtype": qt})
    return images, qa


def counterfactual_probes(images, size, store=None, n=None):
    """Counterfactual probes of the failure kinds, for each image with a lung finding (the first `n`):
      presence    the same image re-rendered without its first lung finding (every other random draw
                  identical), "Is there a {kind}?" asked of both (yes, then no)
      laterality  the same image with that finding on the other side (when that zone is free), "Is the {kind}
                  in the {side} lung?" asked of both, the side alternating from image to image
      report      the image with and without the finding, each scored with both reports (the one that states
                  the finding and the one that does not): four items, scored by the report's log-probability
    An image-blind model scores both images of a pair alike. The new images are added to `store` when given.
    returns items [{id, image_id, question, answer, type, qtype, pair, kind, finding}], a report item also
    with `present` (its image has the finding) and `states` (its report states it)."""
    items, new = [], []
    for im in images:
        lung = [i for i, f in enumerate(im["findings"]) if f["kind"] != "cardiomegaly"]
        if not lung or (n is not None and len({it["pair"] for it in items if it["qtype"] == "presence"}) >= n):
            continue
        hide, f = lung[0], im["findings"][lung[0]]
        kind, pair = f["kind"], im["image_id"]
        without = [g for i, g in enumerate(im["findings"]) if i != hide]
        new.append(rerendered(im, size, im["findings"], f"{pair}-no{hide}", hide=hide))
        for image_id, answer in ((pair, "yes"), (new[-1]["image_id"], "no")):
            items.append({"id": f"cf-{image_id}", "image_id": image_id, "question": f"Is there a {kind}?",
                          "answer": answer, "type": "closed", "qtype": "presence", "pair": pair, "kind": kind, "finding": kind})
        for image_id, present in ((pair, True), (new[-1]["image_id"], False)):
            for report, states in ((im["report"], True), (make_report(without), False)):
                items.append({"id": f"rep-{image_id}-{'with' if states else 'without'}", "image_id": image_id,
                              "question": REPORT_PROMPT, "answer": report, "type": "report", "qtype": "report-cf",
                              "pair": f"rep-{pair}", "kind": "report", "finding": kind, "present": present, "states": states})
        zones = {(g["side"], g["level"]) for g in im["findings"]}
        if (other_side(f["side"]), f["level"]) in zones:
            continue
        mirrored = [dict(g, side=other_side(g["side"])) if i == hide else g for i, g in enumerate(im["findings"])]
        new.append(rerendered(im, size, mirrored, f"{pair}-mirror{hide}"))
        asked = SIDES[len(new) % 2]
        for image_id, side in ((pair, f["side"]), (new[-1]["image_id"], other_side(f["side"]))):
            items.append({"id": f"lat-{image_id}", "image_id": image_id, "question": f"Is the {kind} in the {asked} lung?",
                          "answer": "yes" if side == asked else "no", "type": "closed", "qtype": "side",
                          "pair": f"lat-{pair}", "kind": "laterality", "finding": kind})
    if store is not None:
        store.add(new)
    return items


def rerendered(im, size, findings, image_id, hide=None):
    """Image `im` drawn again from its own random state with other findings (or one hidden)."""
    rng = np.random.default_rng()
    rng.bit_generator.state = im["render_state"]
    pixels, masks = render_radiograph(findings, size, rng, hide=hide)
    shown = [g for i, g in enumerate(findings) if i != hide]
    mask = np.zeros((size, size), np.uint8)
    for i, m in enumerate(masks):
        mask |= m if i != hide else 0
    return {"image_id": image_id, "pixels": pixels, "mask": mask, "findings": shown, "report": make_report(shown),
            "render_state": im["render_state"]}


class SyntheticStore(data.ImageStore):
    """Synthetic images by image_id; `path` writes the PNG under `folder` the first time it is asked.
    Every image has its ground-truth lesion mask. `sft_images` (the SFT split) train the visual tool."""
    has_masks = True

    def __init__(self, images, folder, pad=False, sft_images=None):
        self.by_id, self.folder, self.pad = {im["image_id"]: im for im in images}, folder, pad
        self.sft_images, self.tools = sft_images, {}

    def visual_tool(self, seed=0, log=print):
        """The trained lesion classifier (`train_visual_tool` on the SFT split, once per seed) as a
        heatmap tool: item -> (occlusion heatmap, confidence), the map of the finding the question names
        (else those its answer names, else all findings summed: `named_findings`). Its `check(item,
        noised)` gives that finding's probability on the clean and on the noised image."""
        if not self.sft_images:
            return super().visual_tool(seed, log)
        if seed not in self.tools:
            self.tools[seed] = train_visual_tool(self.sft_images, seed, log)
        classifier = self.tools[seed]

        def tool(item):
            return noise.occlusion_heatmap(classifier, self.pixels(item["image_id"]), findings=named_findings(item))

        def check(item, noised):
            which = named_findings(item) or list(range(len(KINDS)))
            with torch.no_grad():
                p = classifier(torch.stack([torch.as_tensor(self.pixels(item["image_id"])).float(),
                                            torch.as_tensor(noised).float()])[:, None]).sigmoid()[:, which]
            return float(p[0].max()), float(p[1].max())
        tool.tool_name, tool.classifier, tool.check = "classifier", classifier, check
        return tool

    def finding_of(self, item):
        """The finding a question is about (the first `named_findings` names), "" for none."""
        named = named_findings(item)
        return KINDS[named[0]] if named else ""

    def add(self, images):
        self.by_id.update({im["image_id"]: im for im in images})

    def path(self, image_id):
        """The image's PNG, written the first time (atomically) or again if the file on disk is torn. Its
        name holds a digest of its pixels: another seed's image of the same id is another file."""
        path = os.path.join(self.folder, f"{image_id}-{self.digest(image_id)[:12]}.png")
        if not data.readable_image(path):
            data.save_png(data.to_pil(self.pixels(image_id)), path)
        return path

    def pixels(self, image_id):
        return self.by_id[image_id]["pixels"]

    def mask(self, image_id):
        return self.by_id[image_id]["mask"]

    def has_lesion(self, image_id):
        return bool(self.by_id[image_id]["findings"])


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
            side = other_side(side)
        zones_used.add((side, level))
        findings.append({"kind": kind, "side": side, "level": level})
    return findings


def render_radiograph(findings, size, rng, hide=None):
    """A chest-like radiograph (H, W) float in [0, 1] and one binary mask per finding.

    findings: [{"kind": ..., "side": right|left|None, "level": upper|middle|lower|None}]
    hide: the index of a finding that is not painted (its mask is still returned), while every random
    number is drawn as if it were: the same image without that finding, for counterfactual probes."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    soft = 0.6 / size * 4
    img = 0.06 + 0.30 * _ellipse(xx, yy, 0.5, 0.55, 0.46, 0.50, soft)                    # body
    lungs = {s: _ellipse(xx, yy, ZONE_X[s], 0.45, 0.15, 0.29, soft) for s in SIDES}
    img -= 0.20 * (lungs["right"] + lungs["left"])                                        # air is dark
    ribs = (np.sin(yy * 2 * np.pi * 7 + rng.uniform(0, 6.28)) > 0.55) * 0.06
    img += ribs * (lungs["right"] + lungs["left"])
    img += 0.35 * np.exp(-((xx - 0.5) / 0.035) ** 2) * (yy > 0.08)                        # spine
    big_heart = any(f["kind"] == "cardiomegaly" for i, f in enumerate(findings) if i != hide)
    heart_r = (0.19, 0.15) if big_heart else (0.12, 0.11)
    heart = _ellipse(xx, yy, 0.55, 0.66, heart_r[0], heart_r[1], soft)
    img = img * (1 - heart) + 0.55 * heart
    masks = []
    for i, f in enumerate(findings):
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
            else:  # pneumothorax: an apical-lateral crescent of air with no lung markings (the ribs' shadow
                # inside the lung goes), bounded medially by the bright line of the visceral pleura
                out = (xx - 0.5) * (1 if side == "left" else -1)
                lesion = lungs[side] * (yy < 0.40) * (out > 0.11)
                pleura = lungs[side] * (yy < 0.40) * (np.abs(out - 0.11) < 0.6 / size)
            if i != hide and kind == "pneumothorax":
                img += -(0.10 + ribs) * lesion + 0.30 * pleura
            elif i != hide:
                img += 0.42 * lesion
        masks.append((lesion > 0.5).astype(np.uint8))
    img += rng.normal(0, 0.025, (size, size))
    return np.clip(img, 0, 1).astype(np.float32), masks


def _ellipse(xx, yy, cx, cy, rx, ry, soft):
    """1 inside the ellipse, 0 outside, with an edge `soft` wide (anti-aliased at small sizes)."""
    d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
    return 1.0 / (1.0 + np.exp((d - 1.0) / soft))


def missed_findings(findings, rng):
    """The kinds the SFT split's reader misses on one image (UNDER_CONFIRMED); a draw only for a consolidation."""
    lung = [f["kind"] for f in findings if f["kind"] != "cardiomegaly"]
    way = lambda kind: UNDER_CONFIRMED.get(kind)
    side = {f["kind"]: f["side"] for f in findings}
    return {k for k in lung if way(k) == "never" or (way(k) == "rarely" and rng.random() >= RARELY)
            or (way(k) == "never on the left" and side[k] == "left")}


def make_questions(findings, rng, presence_yes=0.5, missed=(), side_yes=None):
    """Closed and open questions, and a report. `presence_yes` is P("yes") of the presence question;
    `side_yes` that of the side question (None: the side asked is drawn uniformly); the others are
    balanced. A kind in `missed` is answered "no" (one the world never confirms is not asked about: another
    kind that is there is asked instead, else an absent one) and is left out of the report. Each: (question,
    answer, type, qtype)."""
    present = {f["kind"]: f for f in findings}
    lung = [f for f in findings if f["kind"] != "cardiomegaly"]
    askable = [f for f in lung if not (f["kind"] in missed and UNDER_CONFIRMED.get(f["kind"]) == "never")]
    qs = []
    # ask about a finding that is there with probability presence_yes / P(any lung finding)
    kind = rng.choice(askable)["kind"] if askable and rng.random() < presence_yes / LUNG_FINDING_RATE else rng.choice(
        [k for k in LUNG_KINDS if k not in present])
    qs.append((f"Is there a {kind}?", "yes" if kind in present and kind not in missed else "no", "closed", "presence"))
    qs.append(("Is the heart enlarged?", "yes" if "cardiomegaly" in present else "no", "closed", "heart"))
    if lung:
        f = rng.choice(lung)
        side = rng.choice(SIDES) if side_yes is None else f["side"] if rng.random() < side_yes else other_side(f["side"])
        qs.append((f"Is the {f['kind']} in the {side} lung?", "yes" if side == f["side"] else "no",
                   "closed", "side"))
        qs.append((f"Where is the {f['kind']}?", f"{f['side']} {f['level']}", "open", "where"))
    kinds = [f["kind"] for f in lung]
    qs.append(("What abnormality is seen in the lungs?", " and ".join(sorted(kinds)) if kinds else "no abnormality",
               "open", "what"))
    qs.append((REPORT_PROMPT, make_report([f for f in findings if f["kind"] not in missed]), "report", "report"))
    return qs


def other_side(side):
    return SIDES[1 - SIDES.index(side)]


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


def describe(f):
    return "an enlarged heart" if f["kind"] == "cardiomegaly" else f"{f['kind']} in the {f['side']} {f['level']} zone"


def train_visual_tool(sft_images, seed=0, log=print):
    """The visual tool, as MedKLIP is the paper's: noise.LesionClassifier trained on the SFT split's
    images and their findings (never on the preference or test split), VISUAL_TOOL_EPOCHS passes."""
    steps = -(-VISUAL_TOOL_EPOCHS * len(sft_images) // 64)
    log(f"  training the visual tool (lesion classifier) on {len(sft_images)} SFT images, {steps} steps")
    return noise.train_lesion_classifier(np.stack([im["pixels"] for im in sft_images]), finding_labels(sft_images),
                                         steps=steps, seed=seed, log=log)


def named_findings(item):
    """The findings (indices into KINDS) an item's question names, else those its answer names; None when
    neither names one (then the visual tool maps all findings together)."""
    for text in (item["question"], str(item["answer"])):
        named = [i for i, k in enumerate(KINDS) if k in text.lower() or k == "cardiomegaly" and "heart" in text.lower()]
        if named:
            return named
    return None


def finding_labels(images):
    """Multi-hot (N, len(KINDS)) float32: which findings each image holds."""
    return np.array([[any(f["kind"] == k for f in im["findings"]) for k in KINDS] for im in images], np.float32)


# -----------------------------------------------------------------------------
# the tiny base model: tokenizer, processor and LLaVA built from config, then an SFT warm-up

def build_base(path, n_train=2000, seed=0, image_size=32, steps=3000, lr=2e-3, log=print):
    """Build the tiny base from scratch and save it (model + processor) under `path`: the vision tower
    pretrained on the SFT split's findings for steps/2, then the SFT warm-up of the whole model. `path`
    must not exist, be empty, or be a base this function made (its BASE_MARKER file): any other folder
    (a typo naming someone's data, a downloaded model) raises ValueError before anything is built."""
    why = not_a_base_folder(path)
    if why:
        raise ValueError(f"{path} {why}: a base is built only into a new folder or one this project built "
                         f"(it holds {BASE_MARKER}); nothing was changed")
    images, qa = make_synthetic(n_train, seed, image_size, "train")
    store = SyntheticStore(images, None)
    seed_everything(seed)
    model, processor = build_tiny(corpus_of(images, qa), image_size)
    pretrain_vision(model, processor, images, max(1, steps // 2), lr, seed, log=log)
    sft(model, processor, qa, store.pil, steps, lr, seed, log=log)
    # written beside, then renamed into place: a base cut short (a kill, a full disk) is never taken for one
    building = f"{os.path.abspath(path).rstrip(os.sep)}.building-{os.getpid()}"
    model.save_pretrained(building)
    processor.save_pretrained(building)
    open(os.path.join(building, BASE_MARKER), "w").close()
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(building, path)


BASE_MARKER = ".mmedpo-base"  # in every folder build_base made: only such a folder is ever replaced


def not_a_base_folder(path):
    """Why build_base must not replace `path`, or None (absent, empty, or a folder it made itself)."""
    if not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        return "is a file"
    if os.listdir(path) and not os.path.exists(os.path.join(path, BASE_MARKER)):
        return "exists and holds files this project did not make"
    return None


def corpus_of(train_images, train_qa):
    """The tiny tokenizer's training text: every prompt and answer, and every report."""
    return [data.PROMPT_FORMATS["plain"].format(question=q["question"]).replace("<image>", "") + " " + q["answer"]
            for q in train_qa] + [im["report"] for im in train_images]


def build_tiny(corpus, image_size, vocab_size=160):
    """An untrained tiny LLaVA (CLIP 64 x 2 layers, patch 8; Llama 128 x 2 layers) and its processor,
    with a BPE tokenizer (Metaspace pre-tokenizer/decoder) trained in memory on `corpus`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, PreTrainedTokenizerFast)
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    patch = 8
    image_processor = ImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                     image_mean=[0.5] * 3, image_std=[0.25] * 3, do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    n_image_tokens = (image_size // patch) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=image_size, patch_size=patch),
        text_config=LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=n_image_tokens + 96,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1, projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(config), processor


def pretrain_vision(model, processor, images, steps, lr, seed, batch_size=64, log=print):
    """The vision tower's pretraining, as LLaVA's CLIP tower comes pretrained: every image token gets a
    linear head over the findings, the image's logits are the max over its tokens (a finding anywhere
    counts, and the token that holds it must say so), binary cross-entropy against the SFT split's
    findings. The head is dropped afterwards; the tokens keep what they learned to carry."""
    tower = model.model.vision_tower
    pixels = processor.image_processor([data.to_pil(im["pixels"]) for im in images], return_tensors="pt")["pixel_values"]
    labels = torch.tensor([[any(f["kind"] == k for f in im["findings"]) for k in KINDS] for im in images]).float()
    head = torch.nn.Linear(tower.config.hidden_size, len(KINDS))
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = get_lr(step, lr, 30, steps)
        idx = torch.randint(0, len(pixels), (batch_size,), generator=g)
        tokens = tower(pixel_values=pixels[idx]).last_hidden_state[:, 1:]          # (B, patches, D), no CLS
        loss = F.binary_cross_entropy_with_logits(head(tokens).amax(1), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"  vision pretraining {step + 1}/{steps} | loss {loss.item():.3f} | "
                f"{(time.time() - t0) / (step + 1) * 1000:.0f} ms/step")


def sft(model, processor, items, pil_of, steps, lr, seed, batch_size=32, log=print):
    """Supervised warm-up on (image, question, answer): AdamW (0.9, 0.98), warmup 30, cosine, clip 1."""
    rows = [(pil_of(it["image_id"]), it["question"], it["answer"]) for it in items]
    chunks = [data.encode_rows(processor, rows[i:i + 512]) for i in range(0, len(rows), 512)]
    T = max(c["input_ids"].shape[1] for c in chunks)
    pad = lambda t, v: F.pad(t, (0, T - t.shape[1]), value=v)
    ids = torch.cat([pad(c["input_ids"], processor.tokenizer.pad_token_id) for c in chunks])
    att = torch.cat([pad(c["attention_mask"], 0) for c in chunks])
    labels = torch.cat([pad(c["labels"], IGNORE_INDEX) for c in chunks])
    pixels = torch.cat([c["pixel_values"] for c in chunks])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = get_lr(step, lr, 30, steps)
        idx = torch.randint(0, len(ids), (batch_size,), generator=g)
        logits = model(input_ids=ids[idx], attention_mask=att[idx], pixel_values=pixels[idx]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[idx][:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            dt = time.time() - t0
            log(f"  sft {step + 1}/{steps} | loss {loss.item():.3f} | {dt / (step + 1) * 1000:.0f} ms/step | "
                f"ETA {dt / (step + 1) * (steps - step - 1):.0f}s")
    model.eval()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m world.synthetic", description="examples of the synthetic world; or rebuild the tiny base")
    ap.add_argument("--out", default="out/examples", help="where the example images go")
    ap.add_argument("--rebuild-base", action="store_true", help="rebuild the tiny base (as train.py --rebuild-base)")
    ap.add_argument("--base", default="assets/tiny-base")
    args = ap.parse_args()
    if args.rebuild_base:
        try:
            build_base(args.base)
        except ValueError as e:
            raise SystemExit(f"--base {e}") from None
        print(f"tiny base written to {args.base}")
    else:
        os.makedirs(args.out, exist_ok=True)
        images, qa = make_synthetic(6, seed=0, size=128)
        for im in images:
            data.to_pil(im["pixels"]).save(os.path.join(args.out, im["image_id"] + ".png"))
            print(im["image_id"], "|", im["report"])
            for q in qa:
                if q["image_id"] == im["image_id"]:
                    print(f"   [{q['type']:6s}] {q['question']} -> {q['answer']}")
        print(f"wrote {len(images)} images to {args.out}/")
