"""MMedPO's data: preference records and their files, Strategy 1 (text pairs) and Strategy 2 (visual
pairs) built by the target model, the batches (records tokenised once, the k responses of B records in
one k*B-row batch, made by `collate_records` and undone by `per_response`), prompt formats and images.

The file reads downward, in the order of the paper's Algorithm 1: the records MMedPO trains on
(`build_mmedpo_pairs`), Strategy 1, Strategy 2, then the batches; a function's helpers follow it, and
the images, which every part uses, close the file. The synthetic world lives in synthetic.py, the real
datasets in real_data.py, HSCR's and FiRe-MPO's records in hscr.py and fire.py; every store of images
has the `ImageStore` interface.

    python -c "import data, synthetic; print(synthetic.make_synthetic(1)[1][0])"

Tests:  python -m pytest -q tests/test_data.py
"""
import hashlib
import math
import os
import random
import time
from collections import Counter, namedtuple

import numpy as np
import torch
from PIL import Image, ImageStat

import score
from guard.checkpoint import atomic_write, read_image, readable_image  # noqa: F401 (read_image: data.read_image)
from mmedpo import IGNORE_INDEX, normalize_scores, token_logps
from noise import (attention_heatmap, detect_lesions, heatmap_from_mask, lesion_coverage, localized_noise,
                   mask_confidence, smooth_heatmap)
from world.rule_judge import NEGATIONS, clean_answer, polarity, words
from guard.checkpoint import read_jsonl
from score import select_dispreferred, write_hallucination


PROMPT_FORMATS = {  # {question} is the user's question; the image placeholder comes first
    "plain": "<image>\n{question}\nAnswer:",
    "mistral": "[INST] <image>\n{question} [/INST]",  # LLaVA-Med v1.5 (Mistral-7B), llava-hf chat layout
    # the Vicuna v1 conversation of the LLaVA codebase, which the MMedPO authors trained LLaVA-Med v1.5 with
    "vicuna": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions. USER: <image>\n{question} ASSISTANT:",
}  # and "chat": the processor's own chat template, one user turn with an image and the question


SPLITS = {"synthetic": ("train", "pref", "val", "test"), "slake": ("train", "validation", "test"), "vqa-rad": ("train", "test"),
          "iu-xray": ("train", "val", "test"), "mimic-cxr": ("train", "val", "test")}


# generation caps (Strategy 1 sampling, evaluation) per dataset, in new tokens: released rejected answers
# have a median of 11 words on SLAKE / VQA-RAD and 45 on IU-Xray, whose reference reports have 51
MAX_NEW_TOKENS = {"synthetic": (48, 48), "slake": (64, 64), "vqa-rad": (64, 64), "iu-xray": (256, 256),
                  "mimic-cxr": (256, 256)}


# -----------------------------------------------------------------------------
# preference records: files and weights

def read_pairs(path, log=print):
    """Pairs (or triplets) from JSONL. A line that is not a JSON object, a record without prompt/chosen/
    rejected text, or one whose images are missing or unreadable, is said with file:line and skipped; a
    missing or non-finite score becomes None (the neutral weight). A weight that is present but not a
    finite number >= 0 raises ValueError with file:line. returns (pairs, n_skipped)."""
    bad, unscored = [], 0
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
            if s is not None:
                log(f"{path}:{n}: score {s!r} is not a number; the pair gets the neutral weight")
            unscored += p.get("source") == "text"
            p["score"] = None
        pairs.append(p)
    if unscored:
        log(f"      {path}: {unscored} text pairs have no score (not scored, or every judge abstained): neutral weights")
    return pairs, skipped


WEIGHTINGS = ("z", "raw", "none")


def assign_weights(pairs, weighting="z", log=None):
    """Each pair's loss weight from its clinical-relevance score.
    z     the paper's Z(.) per source (text and visual scores live on different scales)
    raw   the score as it is (the authors' trainer on their released weighted_score, 0..1)
    none  every weight 1 (plain DPO)
    Unscored pairs get 1 (the neutral weight) under every choice. A source whose scores are all
    equal gets uniform weights under z; that is said out loud, since it switches CRS off for it."""
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


# -----------------------------------------------------------------------------
# MMedPO's records: Strategy 1 (text) and Strategy 2 (visual), built by the target model

def build_mmedpo_pairs(model, processor, cfg, pool, store, pairs_dir, device, log=print):
    """Strategy 1 (text) and Strategy 2 (visual) pairs with their clinical-relevance scores (the
    weights are given by train.py's weighting step). cfg holds the pair settings (train.py's flags).
    returns (pairs, complete): complete is False when a judge failed on some pair, so that the stage
    is not marked done with neutral weights."""
    rng = random.Random(cfg.seed)
    judges = [score.parse_judge(j) for j in cfg.judge] or [score.RuleJudge()]
    selector = score.parse_judge(cfg.selector, "--selector") if cfg.selector else judges[0]
    strategies, pairs, complete = cfg.strategies.split(","), [], True
    if "text" in strategies:
        items = rng.sample(pool, min(cfg.n_text, len(pool)))
        log(f"Strategy 1: sampling {cfg.samples} answers for {len(items)} questions (temperature {cfg.temperature})")
        samples = generate_answers(model, processor, [(store.for_model(it["image_id"]), it["question"]) for it in items],
                                   cfg.prompt_format, 128, cfg.sample_max_new_tokens,
                                   Sampling(cfg.samples, cfg.temperature, cfg.seed), log)
        samples = [[s] for s in samples] if cfg.samples == 1 else samples
        text = build_text_pairs(items, samples, selector, store.path, cfg.seed, log)
        if cfg.weighting != "none":
            results = score.score_pairs(text, judges, os.path.join(pairs_dir, "judge_cache.jsonl"), cfg.workers,
                                        cfg.rounds, log)
            for p, r in zip(text, results):
                p["score"] = r["score"]
                p["provenance"] += f"; score {r['status']} by {'consensus' if r['consensus'] else 'mean'} of " \
                                   f"{[h['judge'] for h in r['history']]}"
            failed = [r for r in results if r["status"] == "failed"]
            if results and len(failed) == len(results):  # a judge that fails every pair is a broken spec, not bad luck
                raise score.JudgeError(f"every one of the {len(results)} text pairs failed to be scored (first reason: "
                                       f"{failed[0].get('reason')}); nothing is trained on neutral weights")
            complete = not failed
            agreed = sum(r["consensus"] for r in results)
            log(f"      consensus reached on {agreed} of {len(results)} text pairs ({agreed / max(1, len(results)):.0%})"
                + (f"; the others are the mean of {cfg.rounds} rounds" if agreed < len(results) else ""))
        pairs += text
    if "visual" in strategies:
        # an answer that states an absence ("no", "no abnormality") is true of the noised image too: no
        # noise can hide what is not there, so such a pair teaches nothing about looking (it is counted)
        shows = [it for it in pool if not states_absence(it["answer"]) and (cfg.heatmap != "mask" or store.has_lesion(it["image_id"]))]
        log(f"Strategy 2: {len(pool) - len(shows)} of {len(pool)} questions answer with an absence, which no noise can "
            f"hide: left out")
        finding_of = getattr(store, "finding_of", None)   # the finding a question is about, where the store knows
        items = [{**it, "finding": it.get("finding") or (finding_of(it) if finding_of else None)}
                 for it in visual_items(shows, cfg.n_visual, cfg.visual_items, rng, finding_of)]
        log(f"Strategy 2: {cfg.noise} noise at k={cfg.noise_step} on {len(items)} images ({cfg.visual_items} draw), "
            f"heatmap {cfg.heatmap}, score {cfg.visual_score}")
        tool = heatmap_tool(cfg.heatmap, model, processor, cfg.prompt_format, store, device, cfg.seed, log)
        visual = build_visual_pairs(items, store, pairs_dir, tool, cfg.noise, cfg.noise_step, cfg.seed, cfg.visual_score, log,
                                    cfg.visual_check)
        pairs += visual
    return pairs, complete


def visual_items(shows, n, rule, rng, finding_of=None):
    """Which questions get a visual pair (--visual-items): `random`, n drawn from all that show something;
    `balanced`, as evenly as the pool allows over the finding each question is about (`finding_of(item)`,
    the store's; questions about none form one more group), so that a rarely asked finding gets its share."""
    if rule == "random" or finding_of is None:
        return rng.sample(shows, min(n, len(shows)))
    groups = {}
    for it in shows:
        groups.setdefault(finding_of(it), []).append(it)
    queues = [rng.sample(g, len(g)) for _, g in sorted(groups.items())]
    out = []
    while len(out) < min(n, len(shows)):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop())
    return out


def build_text_pairs(items, samples, judge, image_path, seed=0, log=print):
    """Strategy 1 (text dispreference D_t). items: [{id, image_id, question, answer}], samples: the
    target model's N sampled answers per item. The judge picks the sample that most clearly
    contradicts the ground truth; if none does, it writes a believable hallucination. Samples that
    carry leaked prompt scaffolding are dropped and counted. returns pairs (score filled in later)."""
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
                      "rejected": rejected, "score": None, "weight": None, "qtype": it.get("qtype") or it["type"],
                      "provenance": how})
    log(f"text pairs: {len(pairs)} ({selected} with a sampled answer, {len(pairs) - selected} injected,"
        f" {leaked} leaked samples dropped)")
    return pairs


def states_absence(answer):
    """True for an answer that says a thing is not there: a leading "no", or only negation words."""
    ws = words(answer)
    return polarity(answer) == "no" or bool(ws) and set(ws) <= NEGATIONS | {"abnormality", "finding", "findings"}


def heatmap_tool(name, model=None, processor=None, prompt_format="plain", store=None, device=None, seed=0, log=print):
    """Where the lesion is (Strategy 2), always one kind of tool: item -> (heatmap (H, W) in [0, 1], confidence),
    or (None, the reason it has none). name: classifier (the store's trained `visual_tool`), detector
    (noise.detect_lesions and its confidence), mask (`mask_heatmap`: the true masks), attention (the target
    model's own, `attention_tool`). The tool's `tool_name` goes into each pair's provenance."""
    if name == "attention":
        tool = attention_tool(model, processor, prompt_format, store.pixels, device)
    elif name == "classifier":
        tool = store.visual_tool(seed, log)
    elif name == "detector":
        tool = lambda item: detect_lesions(torch.as_tensor(store.pixels(item["image_id"])))  # noqa: E731
    elif name == "mask":
        tool = lambda item: mask_heatmap(item, store, log)  # noqa: E731
    else:
        raise ValueError(f"unknown heatmap source {name!r} (classifier, detector, mask, attention)")
    tool.tool_name = getattr(tool, "tool_name", name)
    return tool


def attention_tool(model, processor, fmt, pixels_of, device, layers=2):
    """The target model as its own visual tool: item -> (heatmap, confidence) from the attention of
    the answer tokens to the image tokens in the last `layers` language-model layers."""
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
    model_attention.tool_name = "attention"
    return model_attention


def build_visual_pairs(items, store, out_dir, heatmap, noise="local", k=500, seed=0, visual_score="confidence",
                       log=print, check="keep"):
    """Strategy 2 (visual dispreference D_v): the same answer given to an image whose lesion is noised.
    store: an ImageStore (pixels, mask, path); heatmap: a `heatmap_tool`; noise: local, or global
    (h = 1). The pair's clinical-relevance score (`visual_score`):
        confidence  the visual tool's confidence, as in the paper (the detector's; for ground-truth mask
                    heatmaps the lesion's contrast with its surroundings)
        coverage    an oracle: how much of the *true* lesion the noise covers, where the data has masks
    Items with an empty heatmap (nothing to noise), no mask, or a mask that does not fit their image
    are skipped and counted. A tool that can say so (`heatmap.check`) gives each pair the fall of its
    finding's probability from the clean to the noised image (`tool_fall`); pairs where it does not fall
    are counted and, with check="drop", left out. Noised images and heatmaps are PNGs under out_dir."""
    gen = torch.Generator().manual_seed(seed)
    pairs, skipped = [], Counter()
    for it in items:
        x = torch.as_tensor(store.pixels(it["image_id"]))
        h, confidence = heatmap(it)
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
        fall = None
        if getattr(heatmap, "check", None):
            clean_p, noised_p = heatmap.check(it, read_image(noised_path))   # the noised PNG, as the model sees it
            fall = clean_p - noised_p
            if fall <= 0:
                skipped["tool's probability did not fall" + (" (kept)" if check == "keep" else "")] += 1
                if check == "drop":
                    continue
        truth = lesion_mask(store, it["image_id"]) if visual_score == "coverage" else None
        relevance, how = ((lesion_coverage(h, truth), "the noise's coverage of the true lesion (an oracle)")
                          if truth is not None else (float(confidence), "the visual tool's confidence"))
        pairs.append({"id": pid, "source": "visual", "image": store.path(it["image_id"]),
                      "rejected_image": noised_path, "heatmap": heatmap_path, "prompt": it["question"], "chosen": it["answer"],
                      "rejected": it["answer"], "score": relevance, "weight": None, "qtype": it.get("qtype") or it["type"],
                      "finding": it.get("finding"), "tool_fall": fall,
                      "provenance": f"{noise} noise at k={k}, heatmap {heatmap.tool_name}, score: {how}"})
    log(f"visual pairs: {len(pairs)}" + (" (skipped: " + ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())) + ")"
                                         if skipped else ""))
    return pairs


def mask_heatmap(item, store, log=print):
    """The true lesion as a heatmap: the ground-truth mask or boxes, widened by a soft margin; the confidence
    is the lesion's contrast with its surroundings (noise.mask_confidence). (None, reason) without a mask."""
    x = torch.as_tensor(store.pixels(item["image_id"]))                     # (H, W) in [0, 1]
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
    noised = localized_noise(x[None, None], h[None].float(), k=k, generator=generator)[0, 0]
    paths = [os.path.join(out_dir, sub, name + ".png") for sub in ("noised", "heatmaps")]
    for path, image in zip(paths, (noised, h)):
        save_png(to_pil(image), path)
    return paths


def lesion_mask(store, image_id):
    """The image's true lesion mask when the data has one (synthetic images; SLAKE's masks), else None."""
    try:
        return store.mask(image_id) if store.has_masks else None
    except ValueError:
        return None


Sampling = namedtuple("Sampling", "n temperature seed")   # n answers per row at a temperature, from a seed


def generate_answers(model, processor, rows, prompt_format="plain", batch_size=64, max_new_tokens=16, sample=None,
                     log=None):
    """Answers for rows of (PIL image, question): greedy, or `sample.n` samples each (a `Sampling`).
    Generation stops at EOS or after `max_new_tokens`; how many hit that cap is printed (a capped
    answer is a fragment: raise the cap if it is more than a few).
    returns a list (one per row) of strings, or of lists of strings when sampling several."""
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"  # generation continues from the right end
    device = next(model.parameters()).device
    out, t0, capped, n = [], time.time(), 0, sample.n if sample else 1
    last = t0
    was_training = model.training
    model.eval()
    # generate() samples from the global generator: seeded here, and given back afterwards as it was
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if sample:
            torch.manual_seed(sample.seed)
        try:
            for i in range(0, len(rows), batch_size):
                chunk = rows[i:i + batch_size]
                enc = processor(images=[im for im, _ in chunk], text=[format_prompt(processor, prompt_format, q) for _, q in chunk],
                                return_tensors="pt", padding=True).to(device)
                if "pixel_values" in enc:
                    enc["pixel_values"] = enc["pixel_values"].to(next(model.parameters()).dtype)
                with torch.no_grad():
                    gen = model.generate(**enc, do_sample=sample is not None, temperature=sample and sample.temperature,
                                         top_p=None, top_k=None, max_new_tokens=max_new_tokens, num_return_sequences=n,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                new_tokens = gen[:, enc["input_ids"].shape[1]:]
                capped += int(((new_tokens == tok.eos_token_id).sum(1) == 0).sum()) if new_tokens.shape[1] >= max_new_tokens else 0
                texts = [t.strip() for t in tok.batch_decode(new_tokens, skip_special_tokens=True)]
                out += texts if n == 1 else [texts[j:j + n] for j in range(0, len(texts), n)]
                if log and time.time() - last >= 10 and i + batch_size < len(rows):  # never silent for long
                    done, last = i + batch_size, time.time()
                    rate = done / (last - t0)
                    log(f"  generated {done}/{len(rows)} | {rate:.0f} prompts/s | ETA {(len(rows) - done) / rate:.0f}s")
        finally:
            tok.padding_side = side
            model.train(was_training)
    if log:
        log(f"  {capped} of {len(rows) * n} generations hit the cap of {max_new_tokens} new tokens" +
            (" (raise --max-new-tokens if that is more than a few)" if capped else ""))
    return out


# -----------------------------------------------------------------------------
# batches: every record tokenised once, k responses per record, one k*B-row batch

class RecordDataset(torch.utils.data.Dataset):
    """Records (pairs or triplets) as encoded rows. Each record is tokenised on first use and kept,
    so that a step is model compute only; pixel values are kept too when `cache_pixels` (the tiny
    default), else computed again each time (real datasets; DataLoader workers prefetch them).
    image_at(path) -> the PIL image as the model sees it (`model_image_reader`).
    item i -> list of k row dicts {input_ids (T,), labels (T,), pixel_values (3, H, W), truncated ()}."""

    def __init__(self, records, processor, image_at, prompt_format="plain", max_length=None, cache_pixels=True):
        self.records, self.processor, self.image_at = records, processor, image_at
        self.prompt_format, self.max_length, self.cache_pixels = prompt_format, max_length, cache_pixels
        self.cache = {}

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        if i in self.cache:
            return self.cache[i]
        record, rows = self.records[i], []
        edits = record.get("edit_masks")  # one 0/1 list per row, over its response tokens (FiRe-MPO's records)
        for j, (path, response) in enumerate(record_rows(record)):
            enc = encode_rows(self.processor, [(self.image_at(path), record["prompt"], response)],
                              self.prompt_format, self.max_length)
            row = {k: v[0] for k, v in enc.items()}
            if edits is not None:  # the row's own edit mask, moved to its label positions
                where = (row["labels"] != IGNORE_INDEX).nonzero().flatten()
                row["edit_mask"] = torch.zeros(len(row["labels"]))
                n = min(len(edits[j]), len(where))  # the response may have been cut to fit max_length
                row["edit_mask"][where[:n]] = torch.tensor(edits[j][:n], dtype=torch.float32)
            rows.append(row)
        if self.cache_pixels:
            self.cache[i] = rows
        return rows


def record_rows(record):
    """The (image path, response) rows of one record, in the objective's order: chosen, rejected
    (on the noised image for a visual pair), then for HSCR the second rejected answer, for FiRe-MPO
    the chosen and the rejected answer again on the lesion-corrupted image."""
    rows = [(record["image"], record["chosen"]), (record.get("rejected_image") or record["image"], record["rejected"])]
    if record.get("rejected2") is not None:
        rows.append((record["image"], record["rejected2"]))
    if record.get("corrupted_image") is not None:
        rows += [(record["corrupted_image"], record["chosen"]), (record["corrupted_image"], record["rejected"])]
    return rows


def encode_rows(processor, rows, prompt_format="plain", max_length=None):
    """Tokenize rows of (PIL image, question, response) for one forward pass, right-padded. The prompt goes
    through the processor (which expands <image> into the image tokens); the response is tokenized
    alone, then EOS. Labels are the response tokens, IGNORE_INDEX elsewhere. Beyond `max_length`,
    question tokens go from the middle of the prompt (never image tokens), then the response's end.
    returns {input_ids, attention_mask, labels: (N, T) long, pixel_values: (N, 3, H, W),
             truncated: (N,) long, 0 whole, 1 prompt cut, 2 prompt and response cut}."""
    tok = processor.tokenizer
    prompts = [format_prompt(processor, prompt_format, q) for _, q, _ in rows]
    enc = processor(images=[im for im, _, _ in rows], text=prompts, return_tensors="pt", padding=True)
    image_token_id = tok.convert_tokens_to_ids(getattr(processor, "image_token", "<image>"))
    seqs, labels, truncated = [], [], []
    for i, (_, _, text) in enumerate(rows):
        prompt_ids = enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist()
        response = response_ids(tok, text) + [tok.eos_token_id]
        cut = 0
        if max_length and len(prompt_ids) + len(response) > max_length:
            excess = len(prompt_ids) + len(response) - max_length
            droppable = [j for j in range(1, len(prompt_ids) - 4) if prompt_ids[j] != image_token_id]
            drop = set(droppable[max(0, len(droppable) - excess):])
            prompt_ids, cut = [t for j, t in enumerate(prompt_ids) if j not in drop], 1
            room = max_length - len(prompt_ids)
            if room < 1:
                raise ValueError(f"row {i}: the image tokens alone exceed max_length={max_length}")
            if len(response) > room:  # the response is cut at the end, as the prompt could not give more
                response, cut = response[:room], 2
        seqs.append(prompt_ids + response)
        labels.append([IGNORE_INDEX] * len(prompt_ids) + response)
        truncated.append(cut)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return {"input_ids": right_pad(seqs, pad), "attention_mask": right_pad([[1] * len(s) for s in seqs], 0),
            "labels": right_pad(labels, IGNORE_INDEX), "pixel_values": enc["pixel_values"],
            "truncated": torch.tensor(truncated)}


def format_prompt(processor, prompt_format, question):
    """The prompt text for one question, with the image placeholder where the model expects it."""
    if prompt_format == "chat":
        check_prompt_format(prompt_format, processor)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return PROMPT_FORMATS.get(prompt_format, prompt_format).format(question=question)


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


def response_ids(tokenizer, text):
    """A response's token ids as they stand in a batch (before the closing EOS): FiRe-MPO's edit masks
    are computed on these, so they must come from this one function."""
    return tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"]


def collate_records(batch, pad_id):
    """A list of B records of k rows each -> one batch of k*B rows, response-major (every chosen row,
    then every rejected row, ...), right-padded: {input_ids, attention_mask, labels (kB, T), pixel_values,
    truncated (kB,)} and, for FiRe-MPO records, edit_mask (kB, T). `per_response` undoes the layout."""
    rows = [rec[j] for j in range(len(batch[0])) for rec in batch]
    out = {"input_ids": right_pad([r["input_ids"] for r in rows], pad_id),
           "attention_mask": right_pad([torch.ones_like(r["input_ids"]) for r in rows], 0),
           "labels": right_pad([r["labels"] for r in rows], IGNORE_INDEX),
           "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
           "truncated": torch.stack([r["truncated"] for r in rows])}
    if "edit_mask" in rows[0]:
        out["edit_mask"] = right_pad([r["edit_mask"] for r in rows], 0.0)
    return out


def right_pad(seqs, value, length=None):
    """Sequences (lists or 1-D tensors) -> (N, T) tensor, right-padded with `value`; T the longest or `length`."""
    T = length or max(len(s) for s in seqs)
    dtype = seqs[0].dtype if torch.is_tensor(seqs[0]) else torch.long
    out = torch.full((len(seqs), T), value, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(s, dtype=dtype)
    return out


def response_logps(model, batch, k, first=None, start=None):
    """One forward of a k*B-row batch's responses 0..first-1 (all k by default), per response:
    (logits (B, j, L, V), token log-probs (B, j, L-1), response mask (B, j, L-1)), j = first or k, with
    `mmedpo.token_logps`'s shift and masks. Summed over the tokens, [..., j] is log pi(response j | prompt j).
    Logits are computed only from position `start` on (default `response_start(batch)`: the first one that
    predicts a response token in any row), L = T - start: the prompt's positions, image tokens included,
    are never projected onto the vocabulary. Column t of the outputs is position start + t."""
    j = first or k
    n = batch["input_ids"].shape[0] // k * j          # responses 0..j-1 are the first j*B rows
    start = response_start(batch) if start is None else start
    inputs = {"input_ids": batch["input_ids"][:n], "attention_mask": batch["attention_mask"][:n],
              "pixel_values": batch["pixel_values"][:n]}
    if keeps_logits(model):
        T = batch["input_ids"].shape[1]
        logits = model(**inputs, logits_to_keep=torch.arange(start, T, device=batch["input_ids"].device)).logits
    else:
        logits = model(**inputs).logits[:, start:]
    tokens, response = token_logps(logits, batch["labels"][:n, start:])
    return per_response(logits, j), per_response(tokens, j), per_response(response, j)


def response_start(batch):
    """The first position whose next token is a response token in any row of the batch (0 if none): logits
    before it score nothing."""
    scored = (batch["labels"][:, 1:] != IGNORE_INDEX).any(0).nonzero()
    return int(scored[0]) if len(scored) else 0


def per_response(rows, k):
    """Undo `collate_records`'s layout, (k*B, ...) -> (B, k, ...): column j holds every record's j-th response."""
    return rows.view(k, -1, *rows.shape[1:]).transpose(0, 1)


def keeps_logits(model):
    """Whether the model's forward takes `logits_to_keep` (transformers' LLaVA does), seen through a
    DistributedDataParallel wrapper."""
    import inspect
    forward = getattr(model, "module", model).forward
    try:
        return "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


# -----------------------------------------------------------------------------
# images

def model_image_reader(pad):
    """path -> the PIL image as the model sees it (8-bit grayscale survives the float round trip exactly)."""
    return lambda path: pad_to_square(to_pil(read_image(path))) if pad else to_pil(read_image(path))


class ImageStore:
    """Images by image_id, behind one interface for synthetic arrays in memory and files of a real
    dataset. A store has `pixels(image_id)` (H, W) in [0, 1], `path(image_id)` (a file), `mask(image_id)`
    (the lesion mask, or None), `has_lesion(image_id)`, `has_masks` (the data carries true lesion masks)
    and `pad` (pad to a square before the processor, as LLaVA does)."""
    has_masks, pad = False, False

    def for_model(self, image_id):
        """The PIL image as the model sees it."""
        return pad_to_square(self.pil(image_id)) if self.pad else self.pil(image_id)

    def pil(self, image_id):
        return to_pil(self.pixels(image_id))

    def digest(self, image_id):
        """A hash of the image's content (for cache keys): its pixels."""
        return hashlib.sha256(np.ascontiguousarray(self.pixels(image_id)).tobytes()).hexdigest()[:24]

    def visual_tool(self, seed=0, log=print):
        """The trained lesion classifier, item -> (heatmap, confidence): only labelled training images train one."""
        raise ValueError("--heatmap classifier needs labelled training images (the synthetic default has them); "
                         "use --heatmap detector, mask or attention")


def to_pil(pixels):
    """(H, W) float in [0, 1] (values outside are clipped) -> 8-bit grayscale PIL image."""
    return Image.fromarray((np.clip(np.asarray(pixels, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8), "L")


def pad_to_square(image):
    """LLaVA's preprocessing: pad a PIL image to a square with its mean colour, centred."""
    w, h = image.size
    if w == h:
        return image
    fill = tuple(int(v) for v in ImageStat.Stat(image).mean)
    square = Image.new(image.mode, (max(w, h), max(w, h)), fill if len(fill) > 1 else fill[0])
    square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return square


def save_png(image, path):
    """Write a PIL image atomically: a kill never leaves a torn PNG."""
    atomic_write(path, lambda f: image.save(f, format="PNG"), "wb")
