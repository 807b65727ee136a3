"""Evaluation. First grounding, what the method claims (does the model answer from the image?):
POPE's accuracy, precision, recall, F1 and yes-ratio on balanced presence probes, scored as the authors'
eval_pope.py reads an answer; the AUROC of log P(yes) - log P(no); and counterfactual pairs (the same
image with and without a finding, both answered right). Then the paper's failure (answers from the
training prior on questions whose image breaks it), Med-VQA open recall and closed accuracy (LLaVA-Med),
report BLEU-1..4 and ROUGE-L (pycocoevalcap, as R2Gen and MMedPO's Table 1), and CHAIR-style counts
of findings stated but absent (a wrong side or zone included).

VQA answers are normalized as LLaVA-Med does: lower-case, punctuation to spaces, articles dropped,
number words to digits. Two rule sets score them (`--vqa-scoring`):
    ours (default)  open   = |ground-truth tokens found in the prediction| / |ground-truth tokens|
                    closed = 1 if the ground-truth answer occurs in the prediction as whole words
    llava-med       LLaVA-Med's llava/eval/run_eval.py, for comparing with published tables:
                    closed = 0 unless "yes" or "no" occurs in the prediction as a substring, then 1 iff
                             the ground truth is a substring of it ("a nodule" contains "no")
                    open   = tp / (tp + fn): tp counts the prediction's occurrences of shared words,
                             fn the ground-truth words the prediction lacks
Reports are tokenized the PTB way (lower-case, punctuation removed, articles kept):
    BLEU-n    corpus BLEU with the closest reference length (pycocoevalcap's convention)
    ROUGE-L   LCS F-measure with beta = 1.2, averaged over reports (pycocoevalcap)

Also the pictures a run leaves behind (noised pairs, training curves, attention before/after, as in
the paper's Figure 5).

The file reads downward: the command line, `evaluate` and its metrics, grounding, the table, the pictures,
then the scoring rules and the text normalization every metric uses.

    python -m world.eval --model assets/tiny-base                                # the tiny base, synthetic test split
    python -m world.eval --model assets/tiny-base --adapter out/mmedpo/adapter    # with a trained adapter

Tests:  python -m pytest -q tests/test_eval.py tests/test_benchmark.py
"""
import argparse
import math
import os
import re
import sys
from collections import Counter, defaultdict
from typing import NamedTuple

from guard import checkpoint
import data
import lora
from world import real_data
from world import synthetic
from data import attention_tool, format_prompt, generate_answers, response_ids

NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
ARTICLES = {"a", "an", "the"}
VQA_SCORING = ("ours", "llava-med")
FINDING_WORDS = {"nodule": "nodule", "mass": "mass", "pleural effusion": "effusion", "consolidation": "consolidation",
                 "pneumothorax": "pneumothorax", "cardiomegaly": "cardiomegaly|heart is enlarged|enlarged heart"}


class EvalSettings(NamedTuple):
    """How the answers are asked for and scored."""
    prompt_format: str = "plain"
    max_new_tokens: int = 16
    scoring: str = "ours"          # VQA_SCORING
    batch_size: int = 64


class TestSet(NamedTuple):
    """What a model is evaluated on: test items, grounding probes, their image store, the answer prior."""
    items: list
    probes: list
    store: object
    prior: object = None


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m world.eval", description="Med-VQA / report evaluation of a model (and adapter), Table 1 columns")
    ap.add_argument("--model", required=True, help="folder with a saved LLaVA model and processor")
    ap.add_argument("--adapter", default=None, help="PEFT-format LoRA adapter folder")
    ap.add_argument("--data", default="synthetic", choices=["synthetic", "slake", "vqa-rad", "iu-xray", "mimic-cxr"])
    ap.add_argument("--data-dir", default=None, help="folder of the downloaded dataset")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-items", type=int, default=None, help="evaluate the first N items only")
    ap.add_argument("--n-train", type=int, default=2000, help="synthetic train images (for the answer prior)")
    ap.add_argument("--n-test", type=int, default=200, help="synthetic test images")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt-format", default="plain", help="plain, vicuna (LLaVA's v1 conversation, as the MMedPO "
                    "authors trained LLaVA-Med v1.5), mistral, chat (the processor's "
                    "chat template) or a template with <image> and {question}")
    ap.add_argument("--pad-to-square", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="generation cap; default per task: 48 synthetic, 64 Med-VQA, 256 reports")
    ap.add_argument("--vqa-scoring", default="ours", choices=VQA_SCORING,
                    help="ours (whole words) or llava-med (LLaVA-Med run_eval.py's rules, to compare with published tables)")
    ap.add_argument("--out", default=None, help="write the predictions (and each probe's answer and margin) as JSONL "
                    "here, to re-score them later")
    args = ap.parse_args(argv)
    import torch
    if args.data != "synthetic" and not args.data_dir:
        ap.error(f"--data {args.data} needs --data-dir: {real_data.DOWNLOAD_HINTS[args.data]}")
    check_eval_args(ap, args)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    try:
        model, processor = checkpoint.load_model(args.model, dtype, torch.device(args.device))
    except ValueError as e:
        sys.exit(f"--model {args.model}: {e}")
    data.check_prompt_format(args.prompt_format, processor)
    if args.adapter:
        why = checkpoint.adapter_base_mismatch(args.adapter, args.model)
        if why:
            sys.exit(f"--adapter {args.adapter}: {why}")
        try:
            lora.load_adapter(model, args.adapter)
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            sys.exit(f"--adapter {args.adapter}: {e}")
    if args.data == "synthetic":
        _, train_items = synthetic.make_synthetic(args.n_train, args.seed, args.image_size, "train")
        images, items = synthetic.make_synthetic(args.n_test, args.seed, args.image_size, args.split)
        store = synthetic.SyntheticStore(images, None, args.pad_to_square)
        probes = synthetic.counterfactual_probes(images, args.image_size, store, args.max_items)
    else:
        train_items, _ = real_data.LOADERS[args.data](args.data_dir, "train")
        items, store = real_data.LOADERS[args.data](args.data_dir, args.split)
        store.pad = args.pad_to_square
        probes = [it for it in items if it["type"] == "closed" and it["answer"].strip().lower() in ("yes", "no")]
    items = items[:args.max_items] if args.max_items else items
    if not items:
        sys.exit(f"no {args.split} items to evaluate in --data {args.data}")
    max_new_tokens = args.max_new_tokens or data.MAX_NEW_TOKENS[args.data][1]
    settings = EvalSettings(args.prompt_format, max_new_tokens, args.vqa_scoring, args.batch_size)
    result, preds, probe_preds = evaluate(model, processor, items, store, answer_prior(train_items), probes, settings,
                                          log=print)
    print(format_table({"model": result, "answer prior": result["prior"]}))
    if args.out:
        checkpoint.write_jsonl(args.out, [{**it, "prediction": p} for it, p in zip(items, preds)] +
                               [{**it, **p} for it, p in zip(probes, probe_preds)])
        print(f"predictions written to {args.out}")


def check_eval_args(ap, args):
    """Every flag checked before anything is loaded, naming the flag."""
    bad = [(f, msg) for f, ok, msg in [
        ("--max-items", args.max_items is None or args.max_items >= 1, "must be >= 1 (leave it out for all items)"),
        ("--n-test", args.n_test >= 1, "must be >= 1"), ("--n-train", args.n_train >= 1, "must be >= 1"),
        ("--batch-size", args.batch_size >= 1, "must be >= 1"),
        ("--max-new-tokens", args.max_new_tokens is None or args.max_new_tokens >= 1, "must be >= 1"),
        ("--split", args.split in data.SPLITS[args.data], f"must be one of {', '.join(data.SPLITS[args.data])}"),
        ("--model", os.path.isdir(args.model), "no such folder (pass the local path of a saved checkpoint)"),
        ("--adapter", args.adapter is None or os.path.isdir(args.adapter), "no such folder"),
        ("--out", not (args.out and checkpoint.unwritable(args.out, False)), f"{args.out and checkpoint.unwritable(args.out, False)}"),
        ("--out", not (args.out and checkpoint.guarded_output(args.out)),
         f"{args.out and checkpoint.guarded_output(args.out)}; an output must not replace a model's, an adapter's or a run's file")]
        if not ok]
    if bad:
        ap.error("; ".join(f"{f} {args.__dict__[f[2:].replace('-', '_')]}: {msg}" for f, msg in bad))


def answer_prior(train_items):
    """Majority answer per question text on the training split (the best a model that ignores the image
    can do on questions it has seen); questions never seen get the majority answer of their type.
    returns predict(item) -> answer; predict.share(item) is that answer's share of the training answers
    (how strong the language prior is); predict.vocabulary the words of the training answers."""
    per_q, per_type = defaultdict(Counter), defaultdict(Counter)
    for it in train_items:
        per_q[it["question"]][it["answer"]] += 1
        per_type[it["type"]][it["answer"]] += 1
    counts = lambda it: per_q.get(it["question"]) or per_type.get(it["type"])

    def predict(it):
        c = counts(it)
        return c.most_common(1)[0][0] if c else ""
    predict.share = lambda it: (lambda c: c.most_common(1)[0][1] / sum(c.values()) if c else 0.0)(counts(it))
    predict.vocabulary = {w for it in train_items for w in normalize(it["answer"])}
    return predict


def evaluate(model, processor, items, store, prior=None, probes=None, settings=EvalSettings(), log=None):
    """Greedy answers to every test item (and grounding probe), scored; with the answer prior's score,
    the prior-breaking metrics and the share of broken answers (fragments) if a prior is given, and
    `grounding` if probes are given.
    returns (result, predictions of `items`, [{prediction, margin} of each probe])."""
    probes, (prompt_format, max_new_tokens, scoring, batch_size) = probes or [], settings
    asked = [it for it in probes if it["type"] == "closed" and it.get("qtype") != "side"]  # answered as well as scored
    rows = [(store.for_model(it["image_id"]), it["question"]) for it in items + asked]
    answers = generate_answers(model, processor, rows, prompt_format, batch_size, max_new_tokens, log=log)
    preds, answered = answers[:len(items)], dict(zip(map(id, asked), answers[len(items):]))
    result = vqa_metrics(items, preds, scoring)
    if prior is not None:
        prior_preds = [prior(it) for it in items]
        result["prior"] = vqa_metrics(items, prior_preds, scoring)
        result["prior_breaking"] = hallucination_metrics(items, preds, prior, scoring=scoring)
        result["prior"]["prior_breaking"] = hallucination_metrics(items, prior_preds, prior, scoring=scoring)
        result["fragments"] = fragment_metrics(answers, prior.vocabulary)
        result["prior"]["fragments"] = fragment_metrics(prior_preds, prior.vocabulary)
    scores = probe_scores(model, processor, probes, store, prompt_format, batch_size)
    probe_answers = [answered.get(id(it)) for it in probes]
    if probes:
        result["grounding"] = grounding_metrics(probes, probe_answers, scores)
        if prior is not None:
            result["prior"]["grounding"] = grounding_metrics(
                probes, [prior(it) if id(it) in answered else None for it in probes], [0.0] * len(probes))
    return result, preds, [{"prediction": a, "margin": m} for a, m in zip(probe_answers, scores)]


def probe_scores(model, processor, probes, store, prompt_format="plain", batch_size=64):
    """Each probe's threshold-free score: log P(yes) - log P(no) of a closed question, log P(report | image)
    of a report probe."""
    rows = lambda its: [(store.for_model(it["image_id"]), it["question"]) for it in its]
    closed = [it for it in probes if it["type"] != "report"]
    reports = [it for it in probes if it["type"] == "report"]
    by_id = dict(zip(map(id, closed), yes_no_margins(model, processor, rows(closed), prompt_format, batch_size)))
    by_id.update(zip(map(id, reports), report_logprobs(model, processor, [r + (it["answer"],) for r, it in
                                                                         zip(rows(reports), reports)],
                                                       prompt_format, batch_size)))
    return [by_id[id(it)] for it in probes]


def vqa_metrics(items, predictions, scoring="ours"):
    """items: [{answer, type: open|closed|report, qtype}], predictions: [str]; scoring: ours | llava-med.
    returns {closed, open, n_closed, n_open, per_qtype: {qtype: score}, scoring} and, when there are
    report items, {bleu: [BLEU-1..4], bleu_mean, rouge_l, n_report}."""
    if scoring not in VQA_SCORING:
        raise ValueError(f"unknown VQA scoring {scoring!r}: {' or '.join(VQA_SCORING)}")
    closed_fn, open_fn = (closed_correct, open_recall) if scoring == "ours" else (llava_med_closed, llava_med_open)
    by_type, by_qtype = defaultdict(list), defaultdict(list)
    reports = [(pred, it["answer"]) for it, pred in zip(items, predictions) if it["type"] == "report"]
    for it, pred in zip(items, predictions):
        if it["type"] == "report":
            continue
        s = closed_fn(pred, it["answer"]) if it["type"] == "closed" else open_fn(pred, it["answer"])
        by_type[it["type"]].append(s)
        by_qtype[it.get("qtype", it["type"])].append(s)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    result = {"closed": mean(by_type["closed"]), "open": mean(by_type["open"]),
              "n_closed": len(by_type["closed"]), "n_open": len(by_type["open"]),
              "per_qtype": {k: mean(v) for k, v in sorted(by_qtype.items())}, "scoring": scoring}
    if reports:
        b = bleu([p for p, _ in reports], [r for _, r in reports])
        result.update({"bleu": b, "bleu_mean": sum(b) / 4, "rouge_l": rouge_l([p for p, _ in reports], [r for _, r in reports]),
                       "n_report": len(reports),
                       "report_findings": report_finding_metrics([p for p, _ in reports], [r for _, r in reports])})
    return result


def hallucination_metrics(items, predictions, prior, min_share=0.64, scoring="ours"):
    """The paper's failure, measured: a model that answers from what it learned about the question
    instead of what is in the image. Among the VQA items whose question has a strong prior on the
    training split (its majority answer has at least `min_share` of the answers; on the synthetic SFT
    split the presence questions have 0.65-0.75 and "Is the heart enlarged?" 0.6, the others less):
        prior-breaking items   the image contradicts the prior (truth != the prior's answer)
        hallucination_rate     the fraction of those answered with the prior's answer
        accuracy_breaking      accuracy (or recall) on them: did the right answer take its place?
        accuracy_following     on the items whose truth is the prior's answer (must not drop)
    returns a dict (rates are NaN when there are no such items)."""
    closed_fn, open_fn = (closed_correct, open_recall) if scoring == "ours" else (llava_med_closed, llava_med_open)
    score = lambda it, pred, truth: (closed_fn if it["type"] == "closed" else open_fn)(pred, truth)
    breaking, following = [], []
    for it, pred in zip(items, predictions):
        if it["type"] not in ("closed", "open") or prior.share(it) < min_share:
            continue
        expected = prior(it)
        if normalize(expected) == normalize(it["answer"]):
            following.append(score(it, pred, it["answer"]))
        else:
            breaking.append((score(it, pred, expected) >= 1 and score(it, pred, it["answer"]) < 1,
                             score(it, pred, it["answer"])))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    return {"hallucination_rate": mean([h for h, _ in breaking]), "accuracy_breaking": mean([a for _, a in breaking]),
            "accuracy_following": mean(following), "n_breaking": len(breaking), "n_following": len(following),
            "min_share": min_share}


def fragment_metrics(predictions, vocabulary):
    """Broken answers: an answer is a fragment when it is empty or holds a word that no training answer
    holds ("m", "eumothora"). POPE's rule reads a fragment as "yes", so a model that breaks its answers
    gains recall for free: the share stands in every table. returns {share, n_fragments, n, examples}."""
    broken = [p for p in predictions if not normalize(p) or any(w not in vocabulary for w in normalize(p))]
    return {"share": len(broken) / len(predictions) if predictions else float("nan"), "n_fragments": len(broken),
            "n": len(predictions), "examples": sorted(set(broken))[:5]}


def report_finding_metrics(predictions, references):
    """CHAIR-style counts over reports. A stated finding is hallucinated unless the reference has that
    finding at a compatible place (the same side and zone, or either without one); a reference finding is
    omitted unless the report states it at a compatible place. returns {chair: hallucinated / stated,
    omission: omitted / present, hallucinated, omitted, stated, present}."""
    fits = lambda a, b: a[0] == b[0] and (a[1] is None or b[1] is None or a[1] == b[1])
    stated = present = hallucinated = omitted = 0
    for pred, ref in zip(predictions, references):
        said, truth = report_findings(pred), report_findings(ref)
        stated, present = stated + len(said), present + len(truth)
        hallucinated += sum(not any(fits(s, t) for t in truth) for s in said)
        omitted += sum(not any(fits(s, t) for s in said) for t in truth)
    return {"chair": hallucinated / stated if stated else 0.0, "omission": omitted / present if present else 0.0,
            "hallucinated": hallucinated, "omitted": omitted, "stated": stated, "present": present}


def report_findings(text):
    """The findings a report states as present, read sentence by sentence: {(kind, place)}, place the
    "side level" zone when the sentence names one ("a nodule in the right upper zone"), else None. A
    sentence with a negation ("No pleural effusion.") states nothing."""
    found = set()
    for sentence in re.split(r"[.!?;\n]", str(text).lower()):
        if re.search(r"\b(no|not|without|normal|clear)\b", sentence):
            continue
        zone = re.search(r"\b(right|left) (upper|middle|lower)\b", sentence)
        found |= {(kind, zone.group(0) if zone else None) for kind, pattern in FINDING_WORDS.items()
                  if re.search(rf"\b({pattern})\b", sentence)}
    return found


# -----------------------------------------------------------------------------
# grounding: does the model answer from the image? (balanced presence probes, as POPE scores them)

def yes_no_margins(model, processor, rows, prompt_format="plain", batch_size=64):
    """log P(yes) - log P(no) at the answer's first token, for rows of (PIL image, question): a
    threshold-free reading of what the model would answer."""
    import torch
    tok = processor.tokenizer
    yes, no = response_ids(tok, "yes")[0], response_ids(tok, "no")[0]
    side, tok.padding_side = tok.padding_side, "left"  # left-padded: the last position predicts the first answer token
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    out = []
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            enc = processor(images=[im for im, _ in chunk], text=[format_prompt(processor, prompt_format, q) for _, q in chunk],
                            return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                keep = {"logits_to_keep": 1} if data.keeps_logits(model) else {}    # the last position's only
                logits = model(**{**enc, "pixel_values": enc["pixel_values"].to(dtype)}, **keep).logits[:, -1].float()
            logp = logits.log_softmax(-1)
            out += (logp[:, yes] - logp[:, no]).tolist()
    finally:
        tok.padding_side = side
    return out


def report_logprobs(model, processor, rows, prompt_format="plain", batch_size=64):
    """log P(response | image, question), summed over the response's tokens and its EOS, for rows of
    (PIL image, question, response): how much the model prefers a whole report, without generating one."""
    import torch
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    out = []
    for i in range(0, len(rows), batch_size):
        enc = data.encode_rows(processor, rows[i:i + batch_size], prompt_format)
        batch = {k: v.to(device, dtype) if k == "pixel_values" else v.to(device) for k, v in enc.items()}
        with torch.no_grad():
            out += data.response_logps(model, batch, 1)[1].sum(-1)[:, 0].tolist()
    return out


TIE_BAND = 0.1  # nats: a counterfactual pair whose two scores differ by no more than this counts one half


def grounding_metrics(probes, predictions, margins):
    """The grounding of a model on probes, from its answers (None where a probe is scored only) and its
    scores (log P(yes) - log P(no) of a closed question, log P(report) of a report probe).
    The headline, threshold-free and tie-proof, over the world's failure kinds (synthetic.FAILURE_KINDS: each
    under-confirmed finding's presence pairs, laterality, the report counterfactual; on other data every kind):
        tb_order     per kind, the share of counterfactual pairs whose difference d (`pair_differences`) is
                     above +TIE_BAND, a pair within +-TIE_BAND counting one half; averaged over the kinds
        margin_diff  per kind, the mean of d in nats with its 95 % interval over pairs; averaged likewise
    `controls`: the same over the other kinds (findings the SFT split confirms; they must not drop).
    Also, on the presence probes (closed questions that were answered), as before:
        pair_order   the share of presence pairs whose present image gets the higher margin (ties 1/2)
        macro_auroc  the AUROC of the margin within each finding, averaged over the findings
    and POPE's thresholded metrics of the answers, and the share of pairs with both answers right.
    `per_finding` (presence), `per_kind` (every kind) and `pair_diffs` ({kind: {pair: d}}, for paired checks)."""
    nan = float("nan")
    diffs = pair_differences(probes, margins)
    per_kind = {k: pair_stats(list(v.values())) for k, v in sorted(diffs.items())}
    failure = [k for k in synthetic.FAILURE_KINDS if k in per_kind] or sorted(per_kind)
    asked = [(it, p, m) for it, p, m in zip(probes, predictions, margins)
             if it.get("type", "closed") == "closed" and it.get("qtype") != "side"]
    truths = [str(it["answer"]).strip().lower() != "no" for it, _, _ in asked]
    result = {"pope": pope_metrics([p for _, p, _ in asked], [it["answer"] for it, _, _ in asked]),
              "auroc": auroc([m for _, _, m in asked], truths)}
    by_finding, pairs = defaultdict(list), defaultdict(dict)
    for (it, pred, margin), present in zip(asked, truths):
        by_finding[it.get("finding", "all")].append((margin, present))
        if it.get("pair"):
            pairs[it["pair"]][present] = (margin, pope_answer(pred) == ("yes" if present else "no"), it.get("finding", "all"))
    pairs = [p for p in pairs.values() if len(p) == 2]   # {True: (margin, right, finding), False: ...}
    order = lambda ps: sum((p[True][0] > p[False][0]) + 0.5 * (p[True][0] == p[False][0]) for p in ps) / len(ps) if ps else nan
    per_finding = {}
    for f, rows in sorted(by_finding.items()):
        ps = [p for p in pairs if p[True][2] == f]
        per_finding[f] = {"auroc": auroc(*zip(*rows)), "pair_order": order(ps), "n": len(rows), "n_pairs": len(ps)}
    finite = [v["auroc"] for v in per_finding.values() if not math.isnan(v["auroc"])]
    result.update({"pair_order": order(pairs), "macro_auroc": sum(finite) / len(finite) if finite else nan,
                   "per_finding": per_finding, "per_kind": per_kind, "headline": macro_stats(per_kind, failure),
                   "controls": macro_stats(per_kind, [k for k in per_kind if k not in failure]),
                   "pair_diffs": diffs, "tie_band": TIE_BAND})
    both = [p[True][1] and p[False][1] for p in pairs]
    result["counterfactual"] = {"accuracy": sum(both) / len(both) if both else nan, "n_pairs": len(both)}
    return result


def pair_differences(probes, scores):
    """Each counterfactual pair's difference in nats, by kind: {kind: {pair: d}}. For a closed question,
    d = score(the image where the answer is yes) - score(the image where it is no); for a report,
    d = [s(with, states) - s(with, omits)] - [s(without, states) - s(without, omits)]: how much more the
    model prefers the report that states the finding on the image that has it. Every offset of the image
    or of the text cancels; d is 0 for an image-blind model."""
    parts = defaultdict(dict)
    for it, s in zip(probes, scores):
        if not it.get("pair"):
            continue
        key = (it["present"], it["states"]) if it.get("type") == "report" else str(it["answer"]).strip().lower() != "no"
        parts[(it.get("kind", it.get("finding", "all")), it["pair"])][key] = s
    out = defaultdict(dict)
    for (kind, pair), p in sorted(parts.items()):
        if kind == "report" and len(p) == 4:
            out[kind][pair] = (p[True, True] - p[True, False]) - (p[False, True] - p[False, False])
        elif kind != "report" and len(p) == 2:
            out[kind][pair] = p[True] - p[False]
    return dict(out)


def pair_stats(diffs, band=TIE_BAND):
    """diffs: paired differences in nats -> {tb_order: the share of pairs above +band, those within +-band
    counting one half; margin_diff: their mean, margin_ci: its 95 % t half-width; n_pairs, n_ties}."""
    mean, half = mean_ci(diffs)
    credit = [tie_banded(d, band) for d in diffs]
    return {"tb_order": sum(credit) / len(diffs) if diffs else float("nan"), "margin_diff": mean, "margin_ci": half,
            "n_pairs": len(diffs), "n_ties": sum(c == 0.5 for c in credit)}


def macro_stats(per_kind, kinds):
    """The headline over `kinds` (those present in per_kind): the mean of their tie-banded orders and of their
    mean differences, each kind weighing the same; the interval of the mean difference combines the kinds'
    (independent pairs: the half-widths add in quadrature, divided by the number of kinds)."""
    ks = [k for k in kinds if per_kind.get(k, {}).get("n_pairs")]
    if not ks:
        return {"tb_order": float("nan"), "margin_diff": float("nan"), "margin_ci": float("nan"), "kinds": [], "n_pairs": 0}
    return {"tb_order": sum(per_kind[k]["tb_order"] for k in ks) / len(ks),
            "margin_diff": sum(per_kind[k]["margin_diff"] for k in ks) / len(ks),
            "margin_ci": sum(per_kind[k]["margin_ci"] ** 2 for k in ks) ** 0.5 / len(ks), "kinds": ks,
            "n_pairs": sum(per_kind[k]["n_pairs"] for k in ks)}


def paired_change(before, after, kinds=None, band=TIE_BAND):
    """What training did to the headline, pair by pair (the same counterfactual pairs before and after):
    per kind the mean change of each pair's tie-banded credit and of its difference d in nats, each with
    its 95 % interval over pairs, then their means over `kinds` (default: the headline's), intervals
    combined as in `macro_stats`. `raises`: the macro credit change's interval lies above 0; `lowers`:
    below. before, after: grounding_metrics results."""
    kinds = kinds or after["headline"]["kinds"]
    per_kind = {}
    for k in kinds:
        b, a = before["pair_diffs"].get(k, {}), after["pair_diffs"].get(k, {})
        common = sorted(set(a) & set(b))
        if common:
            (dc, hc), (dd, hd) = (mean_ci([tie_banded(a[p], band) - tie_banded(b[p], band) for p in common]),
                                  mean_ci([a[p] - b[p] for p in common]))
            per_kind[k] = {"d_tb": dc, "d_tb_ci": hc, "d_nats": dd, "d_nats_ci": hd, "n_pairs": len(common)}
    if not per_kind:
        return {"per_kind": {}, "d_tb": float("nan"), "d_tb_ci": float("nan"), "d_nats": float("nan"),
                "d_nats_ci": float("nan"), "raises": False, "lowers": False}
    macro = lambda key: sum(v[key] for v in per_kind.values()) / len(per_kind)
    spread = lambda key: sum(v[key] ** 2 for v in per_kind.values()) ** 0.5 / len(per_kind)
    out = {"per_kind": per_kind, "d_tb": macro("d_tb"), "d_tb_ci": spread("d_tb_ci"), "d_nats": macro("d_nats"),
           "d_nats_ci": spread("d_nats_ci")}
    return {**out, "raises": out["d_tb"] - out["d_tb_ci"] > 0, "lowers": out["d_tb"] + out["d_tb_ci"] < 0}


def tie_banded(d, band=TIE_BAND):
    """A pair's credit: 1 above +band, 0 below -band, one half within."""
    return 1.0 if d > band else 0.0 if d < -band else 0.5


def mean_ci(xs):
    """(mean, 95 % t half-width) of xs; (nan, nan) when empty, half-width inf for one value."""
    n = len(xs)
    if not n:
        return float("nan"), float("nan")
    mean = sum(xs) / n
    if n == 1:
        return mean, float("inf")
    return mean, t975(n - 1) * (sum((x - mean) ** 2 for x in xs) / (n - 1)) ** 0.5 / n ** 0.5


T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df):
    """The 97.5 % quantile of Student's t with df degrees of freedom: the table up to 30, then the
    Cornish-Fisher expansion in 1/df (within 0.001 of the tables there)."""
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def pope_metrics(predictions, truths):
    """POPE's accuracy, precision, recall, F1 and yes-ratio ("yes" is the positive class). F1 and recall
    rise with a lean towards "yes": read them beside accuracy and the yes-ratio (0.5 on balanced probes
    for an unbiased model)."""
    pred = [pope_answer(p) == "yes" for p in predictions]
    true = [str(t).strip().lower() != "no" for t in truths]
    tp = sum(p and t for p, t in zip(pred, true))
    fp = sum(p and not t for p, t in zip(pred, true))
    fn = sum(t and not p for p, t in zip(pred, true))
    n = len(pred)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": sum(p == t for p, t in zip(pred, true)) / n if n else float("nan"), "precision": precision,
            "recall": recall, "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(pred) / n if n else float("nan"), "n": n}


def pope_answer(text):
    """yes or no, as the authors' eval_pope.py reads an answer: its first sentence, commas removed,
    split on spaces; "No", "no" or "not" among the words means no, anything else yes."""
    first = str(text).split(".")[0] if "." in str(text) else str(text)
    return "no" if {"No", "no", "not"} & set(first.replace(",", "").split(" ")) else "yes"


def auroc(scores, labels):
    """Area under the ROC curve of `scores` for binary `labels`: P(a positive outscores a negative),
    ties counting one half (the Mann-Whitney U statistic). NaN without both classes."""
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def format_table(rows):
    """rows: {name: evaluate/vqa_metrics result} -> a text table. First grounding, what the method claims
    (POPE on balanced presence probes, the yes/no AUROC, counterfactual pairs), with the yes-ratio beside
    it; then closed/open accuracy, the hallucination rate and accuracy on prior-breaking and prior-following
    items, per-question-type scores; and for report generation BLEU, ROUGE-L and CHAIR-style counts."""
    nan, lines = float("nan"), []
    g = {name: r["grounding"] for name, r in rows.items() if "grounding" in r}
    if g:
        head = [r["headline"] for r in g.values() if r.get("headline", {}).get("n_pairs")]
        if head:
            first = next(r for r in g.values() if r.get("headline", {}).get("n_pairs"))
            lines.append(f"{'grounding':14s} {'tb-order':>8s} {'Δnats [95 % interval]':>24s} {'controls':>8s} | "
                         f"{'pair-ord':>8s} {'mAUROC':>7s} {'bal-acc':>7s} {'cf-acc':>7s} {'yes%':>7s} {'F1':>7s} {'frag%':>7s}")
        else:
            lines.append(f"{'grounding':14s} {'pair-ord':>8s} {'mAUROC':>7s} {'bal-acc':>7s} {'cf-acc':>7s} {'yes%':>7s} "
                         f"{'F1':>7s} {'frag%':>7s}")
        for name, r in g.items():
            p = r["pope"]
            frag = rows[name].get("fragments", {}).get("share", nan)
            rest = (f"{r.get('pair_order', nan):8.3f} {r.get('macro_auroc', nan):7.3f} {p['accuracy']:7.3f} "
                    f"{r['counterfactual']['accuracy']:7.3f} {p['yes_ratio']:7.3f} {p['f1']:7.3f} {frag:7.3f}")
            if head:
                h, c = r.get("headline", {}), r.get("controls", {})
                lines.append(f"{name:14s} {h.get('tb_order', nan):8.3f} {interval(h):>24s} {c.get('tb_order', nan):8.3f} | {rest}")
            else:
                lines.append(f"{name:14s} {rest}")
        if head:
            kinds = first["headline"]["kinds"]
            lines += [f"The headline, threshold-free and tie-proof, over the world's failure kinds ({', '.join(kinds)}; "
                      f"{first['headline']['n_pairs']} counterfactual pairs: the same image with and without the finding, "
                      f"or with it on the other side): tb-order, the share of pairs whose difference d (in nats) is above "
                      f"+{first['tie_band']}, a pair within ±{first['tie_band']} nat counting one half, averaged over "
                      f"the kinds; Δnats, the mean d with its 95 % interval; controls, tb-order over the other findings. "
                      f"d = log P(yes) - log P(no) on the image where the answer is yes minus on the other; for reports, "
                      f"how much more the report stating the finding is preferred on the image that has it."]
        n = next(iter(g.values()))
        lines += [f"{n['pope']['n']} balanced presence probes ({n['counterfactual']['n_pairs']} presence pairs). pair-ord, "
                  f"the share of those pairs whose present image has the higher margin (ties: exactly equal); mAUROC, "
                  f"that margin's AUROC per finding, averaged. Thresholded: bal-acc, yes%, F1 (POPE's scoring), cf-acc "
                  f"(both answers of a pair right); frag%: answers holding a word no training answer holds", ""]
        kinds = sorted({k for r in g.values() for k in r.get("per_kind", {})},
                       key=lambda k: (k not in synthetic.FAILURE_KINDS, synthetic.FAILURE_KINDS.index(k)
                                      if k in synthetic.FAILURE_KINDS else 0, k))
        if kinds:
            lines.append(f"{'tb-order/Δnats':14s} " + " ".join(f"{k[:13]:>13s}" for k in kinds))
            for name, r in g.items():
                cell = lambda v: f"{v['tb_order']:.2f}/{v['margin_diff']:+.2f}" if v else "-"
                lines.append(f"{name:14s} " + " ".join(f"{cell(r.get('per_kind', {}).get(k)):>13s}" for k in kinds))
            counts = next(iter(g.values())).get("per_kind", {})
            lines += ["pairs per kind: " + ", ".join(
                f"{k} {counts[k]['n_pairs']}" for k in kinds if k in counts), ""]
        findings = sorted({f for r in g.values() for f in r.get("per_finding", {})})
        if len(findings) > 1:
            lines.append(f"{'AUROC/pair-ord':14s} " + " ".join(f"{f[:11]:>11s}" for f in findings))
            for name, r in g.items():
                cell = lambda v: f"{v['auroc']:.2f}/{v['pair_order']:.2f}" if v else "-"
                lines.append(f"{name:14s} " + " ".join(f"{cell(r.get('per_finding', {}).get(f)):>11s}" for f in findings))
            lines.append("")
    vqa = [r for r in rows.values() if r.get("n_closed") or r.get("n_open")]
    if vqa:
        qtypes = sorted({q for r in vqa for q in r["per_qtype"]})
        pb = any("prior_breaking" in r for r in vqa)
        lines.append(f"{'':14s} {'closed':>7s} {'open':>7s} " + (f"{'halluc':>7s} {'pb-acc':>7s} {'pf-acc':>7s} " if pb else "")
                     + " ".join(f"{q[:9]:>9s}" for q in qtypes))
        for name, r in rows.items():
            h = r.get("prior_breaking", {})
            lines.append(f"{name:14s} {r['closed']:7.3f} {r['open']:7.3f} " +
                         (f"{h.get('hallucination_rate', nan):7.3f} {h.get('accuracy_breaking', nan):7.3f} "
                          f"{h.get('accuracy_following', nan):7.3f} " if pb else "") +
                         " ".join(f"{r['per_qtype'].get(q, nan):9.3f}" for q in qtypes))
        scoring = {r.get("scoring", "ours") for r in vqa}
        lines.append(f"VQA scoring: {', '.join(sorted(scoring))}" +
                     (" (whole-word matches)" if scoring == {"ours"} else " (LLaVA-Med's run_eval.py rules)"
                      if scoring == {"llava-med"} else ""))
        if pb:
            lines.append("halluc: prior-breaking questions answered with the training prior's answer (answering 'yes' to "
                         "everything scores 0); pb-acc / pf-acc: accuracy where the image breaks / follows the prior")
    if any("bleu_mean" in r for r in rows.values()):
        lines += ["", f"{'':14s} {'BLEU':>7s} {'ROUGE-L':>8s} " + " ".join(f"{'BLEU-' + str(n):>7s}" for n in range(1, 5))
                  + f" {'CHAIR':>7s} {'omitted':>8s}"]
        for name, r in rows.items():
            f = r.get("report_findings", {})
            lines.append(f"{name:14s} {100 * r['bleu_mean']:7.2f} {100 * r['rouge_l']:8.2f} " +
                         " ".join(f"{100 * b:7.2f}" for b in r["bleu"]) +
                         f" {f.get('chair', nan):7.3f} {f.get('omission', nan):8.3f}")
        lines.append("BLEU is the mean of BLEU-1..4; reports tokenized as pycocoevalcap (articles kept); CHAIR: "
                     "findings stated but absent (or at the wrong side or zone) / stated; omitted: present but not stated")
    return "\n".join(lines)


def interval(stats):
    """'+0.123 [+0.045, +0.201]': a mean difference in nats with its 95 % interval."""
    m, h = stats.get("margin_diff", float("nan")), stats.get("margin_ci", float("nan"))
    return f"{m:+.3f} [{m - h:+.3f}, {m + h:+.3f}]"


# -----------------------------------------------------------------------------
# pictures (PIL only)

def save_pictures(folder, model, processor, records, history, test, answers, fmt, log=print):
    """The run's pictures: noised pairs, training curves, attention before/after, examples. `test` is a
    TestSet, `answers` the (before, after) answers to its items. A picture that cannot be drawn is said
    and skipped: it never costs a finished run."""
    (items, _, store, prior), (before, after) = test, answers
    device = next(model.parameters()).device
    lesion_items = ([it for it in items if it["qtype"] == "where"] or items)[:4]
    pictures = [("noise_grid.png", lambda p: save_noise_grid(records, p)), ("curves.png", lambda p: save_curves(history, p)),
                ("attention.png", lambda p: save_attention_figure(model, processor, lesion_items, store.pixels, fmt, device, p)),
                ("examples.png", lambda p: save_examples(items, before, after, prior, store.pixels, p))]
    for name, draw in pictures:
        try:
            draw(os.path.join(folder, name))
        except Exception as e:
            log(f"      {name} not drawn ({type(e).__name__}: {e})")


def save_attention_figure(model, processor, items, pixels_of, fmt, device, path, scale=4):
    """For a few test questions: the image, the attention overlay of the base model (adapter off)
    and of the trained model, as in the paper's Figure 5."""
    import numpy as np
    from PIL import Image
    tool = attention_tool(model, processor, fmt, pixels_of, device)
    rows = []
    for it in items:
        with lora.disable_lora(model):
            before, _ = tool(it)
        after, _ = tool(it)
        gray = np.clip(np.asarray(pixels_of(it["image_id"])), 0, 1)
        overlay = lambda h: np.stack([np.clip(0.6 * gray + 0.7 * h.numpy(), 0, 1), 0.6 * gray, 0.6 * gray], -1)
        rows.append([np.stack([gray] * 3, -1), overlay(before), overlay(after)])
    h, w = rows[0][0].shape[:2]
    grid = Image.new("RGB", (3 * w * scale, len(rows) * h * scale))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            tile = Image.fromarray((im * 255).astype(np.uint8)).resize((w * scale, h * scale), Image.NEAREST)
            grid.paste(tile, (c * w * scale, r * h * scale))
    grid.save(path)


def save_noise_grid(pairs, path, n=4, scale=4):
    """Clean image | heatmap | noised image, one row per visual pair that names its heatmap file."""
    from PIL import Image
    rows = [p for p in pairs if p["source"] == "visual" and p.get("heatmap")][:n]
    if not rows:
        return
    ims = [[Image.open(p["image"]), Image.open(p["heatmap"]), Image.open(p["rejected_image"])] for p in rows]
    w, h = ims[0][0].size
    grid = Image.new("L", (3 * w * scale, len(rows) * h * scale))
    for r, row in enumerate(ims):
        for c, im in enumerate(row):
            grid.paste(im.convert("L").resize((w * scale, h * scale), Image.NEAREST), (c * w * scale, r * h * scale))
    grid.save(path)


def save_examples(items, before, after, prior, pixels_of, path, n=4, scale=4):
    """Test questions where the base answered with the training prior against the image and the trained
    model did not (then others that changed): image, question, truth, both answers."""
    from PIL import Image, ImageDraw
    import numpy as np
    right = lambda it, pred: (closed_correct if it["type"] == "closed" else open_recall)(pred, it["answer"]) >= 1
    vqa = [(it, b, a) for it, b, a in zip(items, before, after) if it["type"] in ("closed", "open")]
    fixed = [x for x in vqa if normalize(x[1]) == normalize(prior(x[0])) and not right(x[0], x[1]) and right(x[0], x[2])]
    changed = [x for x in vqa if normalize(x[1]) != normalize(x[2]) and x not in fixed]
    rows = (fixed + changed)[:n]
    if not rows:
        return
    h, w = np.asarray(pixels_of(rows[0][0]["image_id"])).shape
    tile, text_w = h * scale, 420
    img = Image.new("RGB", (tile + text_w, tile * len(rows)), "white")
    d = ImageDraw.Draw(img)
    for r, (it, b, a) in enumerate(rows):
        gray = (np.clip(np.asarray(pixels_of(it["image_id"])), 0, 1) * 255).astype(np.uint8)
        img.paste(Image.fromarray(gray).convert("RGB").resize((w * scale, tile), Image.NEAREST), (0, r * tile))
        lines = [it["question"], f"truth: {it['answer']}   (training prior: {prior(it)})",
                 f"before: {b}" + ("   <- the prior" if normalize(b) == normalize(prior(it)) else ""),
                 f"after:  {a}" + ("   (right)" if right(it, a) else "   (wrong)")]
        for j, line in enumerate(lines):
            d.text((tile + 10, r * tile + 10 + 22 * j), line[:64], fill="black" if j != 2 else (170, 30, 30))
    img.save(path)


def save_curves(history, path, keys=("loss", "reward_acc", "margin"), size=(420, 240)):
    """A panel per key against the step: the raw values (light) and a running mean over 10 steps."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (size[0] * len(keys), size[1]), "white")
    d = ImageDraw.Draw(img)
    for k, key in enumerate(keys):
        ys = [h[key] for h in history]
        if len(ys) < 2:
            continue
        smooth = [sum(ys[max(0, i - 9):i + 1]) / len(ys[max(0, i - 9):i + 1]) for i in range(len(ys))]
        left = k * size[0]
        x0, y0, w, h = left + 50, 20, size[0] - 60, size[1] - 50
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1
        to_xy = lambda series: [(x0 + w * i / (len(series) - 1), y0 + h * (1 - (y - lo) / (hi - lo)))
                                for i, y in enumerate(series)]
        d.rectangle([x0, y0, x0 + w, y0 + h], outline="gray")
        d.line(to_xy(ys), fill=(170, 190, 230), width=1)
        d.line(to_xy(smooth), fill="navy", width=2)
        d.text((x0, 4), f"{key}, steps 1..{len(ys)} (mean of 10 in dark)", fill="black")
        d.text((left + 4, y0), f"{hi:.3g}", fill="black")
        d.text((left + 4, y0 + h - 10), f"{lo:.3g}", fill="black")
    img.save(path)


# -----------------------------------------------------------------------------
# the scoring rules: VQA answers (ours and LLaVA-Med's), reports (BLEU, ROUGE-L), and the text normalization
# every rule shares

def closed_correct(prediction, truth):
    gt, pred = " ".join(normalize(truth)), " ".join(normalize(prediction))
    return float(bool(gt) and re.search(rf"\b{re.escape(gt)}\b", pred) is not None)


def open_recall(prediction, truth):
    gt = normalize(truth)
    if not gt:
        return 0.0
    common = Counter(normalize(prediction)) & Counter(gt)
    return sum(common.values()) / len(gt)


def llava_med_closed(prediction, truth):
    """LLaVA-Med's closed rule: a miss unless 'yes' or 'no' is a substring of the prediction, then a hit
    iff the ground truth is a substring of it."""
    gt, pred = " ".join(normalize(truth)), " ".join(normalize(prediction))
    return float(("yes" in pred or "no" in pred) and gt in pred)


def llava_med_open(prediction, truth):
    """LLaVA-Med's open recall tp / (tp + fn): tp counts the prediction's occurrences of every word it
    shares with the ground truth, fn the ground-truth occurrences of words the prediction lacks."""
    pred, gt = Counter(normalize(prediction)), Counter(normalize(truth))
    tp = sum(n for w, n in pred.items() if w in gt)
    fn = sum(n for w, n in gt.items() if w not in pred)
    return tp / (tp + fn) if tp + fn else 0.0


def bleu(predictions, references, max_n=4, tokenize=None):
    """Corpus BLEU-1..max_n. references: one string or a list of strings per prediction; tokenize: str -> tokens
    (`report_tokens` by default)."""
    tokenize = tokenize or report_tokens
    tiny, small = 1e-15, 1e-9  # pycocoevalcap's guards against log(0)
    match, total = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for pred, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else refs
        c = tokenize(pred)
        rs = [tokenize(r) for r in refs]
        cand_len += len(c)
        ref_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]  # closest reference length
        for n in range(1, max_n + 1):
            grams = Counter(tuple(c[i:i + n]) for i in range(len(c) - n + 1))
            best = Counter()
            for r in rs:
                best |= Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            match[n - 1] += sum((grams & best).values())
            total[n - 1] += max(len(c) - n + 1, 0)
    bp = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / max(cand_len, tiny))
    scores, log_sum = [], 0.0
    for n in range(max_n):
        log_sum += math.log((match[n] + tiny) / (total[n] + small))
        scores.append(bp * math.exp(log_sum / (n + 1)))
    return scores


def rouge_l(predictions, references, beta=1.2, tokenize=None):
    """Mean over predictions of the LCS F-measure against the best-matching references (`report_tokens` by default)."""
    tokenize, scores = tokenize or report_tokens, []
    for pred, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else refs
        c = tokenize(pred)
        precs, recs = [], []
        for r in refs:
            r = tokenize(r)
            lcs = _lcs(c, r)
            precs.append(lcs / len(c) if c else 0.0)
            recs.append(lcs / len(r) if r else 0.0)
        p, r = max(precs), max(recs)
        scores.append((1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p > 0 and r > 0 else 0.0)
    return sum(scores) / max(len(scores), 1)


def _lcs(a, b):
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def report_tokens(text):
    """Report tokens as pycocoevalcap's PTB tokenizer leaves them: lower-case, punctuation tokens removed,
    articles and numbers kept; a word with an inner hyphen or apostrophe stays one token ("x-ray")."""
    return re.findall(r"[^\W_]+(?:['-][^\W_]+)*", str(text).lower())


def normalize(text):
    """VQA answer tokens: lower-case, punctuation to spaces, articles dropped, number words to digits."""
    words = re.sub(r"[^\w\s]", " ", str(text).lower()).split()
    return [NUMBERS.get(w, w) for w in words if w not in ARTICLES]


if __name__ == "__main__":
    main()
