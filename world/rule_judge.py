"""The offline judge and editor: a deterministic heuristic stand-in for the Med-LLM judges (not a
medical judgment), so that every step of the paper runs without a server.

`RuleJudge` reads the same prompts the LLM judges get (score.py writes them: a `Task:` line and
labelled fields) and replies in the same formats, so the consensus, selection, injection and editing
code paths are the ones used with real judges:
    score   `rule_score`: 0-10 from a severity table of the clinical slot the wrong answer changes
    select  the candidate with the highest rule score (at least 5), else "none"
    inject  `inject_hallucination`: one clinically confusable swap of the ground truth
    edit    `rule_edit`: the smallest correction of an answer towards the ground truth (FiRe-MPO)

    python -c "from world import rule_judge as r; print(r.rule_score('Is there a nodule?', 'yes', 'no'))"

stdlib only. Tests:  python -m pytest -q tests/test_score.py
"""
import difflib
import json
import random
import re


class RuleJudge:
    """Offline stand-in for the Med-LLM judges: a deterministic heuristic, not a medical judgment.

    It reads the same prompts the LLM judges get (the `Task:` line and the labelled fields) and
    answers in the same formats, so the consensus, selection and injection code paths are the ones
    used with real judges. Scoring rules are in `rule_score`; injection in `inject_hallucination`.
    Shown a previous score, it agrees when that score is within `tolerance` points of its own, else it
    proposes the midpoint of the two (rounded towards its own), as a judge who weighs a colleague's view:
    judges whose severity tables differ then converge instead of cycling."""

    def __init__(self, name="rule", severity="standard", tolerance=2):
        if severity not in SEVERITY:
            raise ValueError(f"unknown severity table {severity!r}: {', '.join(SEVERITY)}")
        self.name, self.model, self.severity, self.tolerance = name, f"rule-v3-{severity}", severity, tolerance

    def __call__(self, messages):
        text = messages[-1]["content"]
        f = dict(re.findall(r"^([A-Za-z][\w -]*?): ?(.*)$", text, flags=re.M))
        task = f.get("Task")
        if task == "score":
            own = rule_score(f["Question"], f["Ground-truth answer"], f["Dispreferred answer"], self.severity)
            prev = f.get("Previous score")
            if prev is None:
                return json.dumps({"agree": False, "score": own})
            prev = int(prev)
            if abs(prev - own) <= self.tolerance:
                return json.dumps({"agree": True, "score": prev})
            midpoint = (prev + own + (1 if own > prev else 0)) // 2  # rounded towards its own score
            return json.dumps({"agree": False, "score": midpoint})
        if task == "select":
            cands = [(int(k.split()[-1]), v) for k, v in f.items() if k.startswith("Candidate ")]
            scored = [(rule_score(f["Question"], f["Ground-truth answer"], v), -i, i) for i, v in cands]
            best = max(scored) if scored else None
            return json.dumps({"choice": best[2] if best and best[0] >= 5 else "none"})
        if task == "inject":
            return inject_hallucination(f["Question"], f["Ground-truth answer"], int(f.get("Seed", 0)))
        if task == "edit":
            edited, _ = rule_edit(f["Question"], f["Ground-truth answer"], f["Answer"])
            return "UNCHANGED" if edited is None else edited
        raise ValueError(f"RuleJudge: unknown task {task!r}")


# -----------------------------------------------------------------------------
# the heuristics (vocabulary of chest/abdomen/brain/spine radiology)

SYSTEMS = {  # organ system -> words that place an answer in it
    "chest": "lung lungs pulmonary pleural pleura heart cardiac cardiomegaly aorta aortic trachea "
             "mediastinum mediastinal rib ribs diaphragm hemidiaphragm hemidiaphragmatic pneumothorax "
             "effusion consolidation nodule hilar hilum thorax thoracic chest azygoesophageal bronchi",
    "abdomen": "liver hepatic kidney kidneys renal bowel colon intestine intestines intestinal spleen "
               "pancreas gallbladder stomach bladder duodenal duodenum abdomen abdominal sigmoid "
               "appendix quadrant abscess",
    "brain": "brain cerebral cerebellum ventricle ventricles frontal temporal parietal occipital skull "
             "sinus horn hemorrhage gyrus",
    "spine": "spine spinal vertebra vertebrae vertebral disc fracture femur bone bones joint pelvis",
}
SYSTEM_OF = {w: s for s, words in SYSTEMS.items() for w in words.split()}
SLOTS = {  # clinically meaningful slots: a changed value is a believable error
    "laterality": "left right bilateral",
    "location": "upper middle lower apex apical base basal central peripheral anterior posterior zone lobe",
    "size": "small large enlarged normal mild moderate severe wide widened narrow",
    "finding": "nodule mass effusion consolidation pneumothorax cardiomegaly atelectasis edema fracture "
               "hemorrhage abscess cyst tumor lesion opacity infiltrate obstruction calcification",
    "organ": " ".join(SYSTEM_OF),
    "modality": "ct mri xray radiograph ultrasound t1 t2 dwi flair pet contrast",
    "status": "normal abnormal",
    "character": "homogeneous heterogeneous solid cystic hypodense hyperdense hyperintense hypointense",
}
MEDICAL = set(SYSTEM_OF) | {w for v in SLOTS.values() for w in v.split()} | set("""splenomegaly ascites
infarct hydrocephalus herniation lytic intraperitoneal enhancing air fluid level""".split())
NEGATIONS = {"no", "not", "without", "none", "absent", "normal", "unremarkable"}
COMMON = set("""a an the is are was were be been this that these those there here it its of in on at to
from with by for and or but as which what where who how any some all each both other seen shown shows
appears appear image scan picture located present visible evident there's has have had can may might
typically indicates indicate related called sign type yes no not very significant structure area side
one two three consistent likely seems""".split())
SWAPS = [  # for the injector: clinically confusable pairs, applied both ways
    ("left", "right"), ("upper", "lower"), ("nodule", "mass"), ("effusion", "consolidation"),
    ("pneumothorax", "atelectasis"), ("small", "large"), ("enlarged", "normal"),
    ("homogeneous", "heterogeneous"), ("t1", "t2"), ("ct", "mri"), ("present", "absent"),
    ("abnormal", "normal"), ("anterior", "posterior"), ("frontal", "parietal"), ("temporal", "occipital"),
    ("bilateral", "left"), ("hyperintense", "hypointense"), ("hypodense", "hyperdense"), ("sigmoid", "transverse"),
    ("liver", "spleen"), ("solid", "cystic"), ("increased", "decreased"),
]
FALLBACK_FINDINGS = {  # when no swap applies: a confusable finding of the question's organ system
    "chest": ["pleural effusion", "a pulmonary nodule", "consolidation", "cardiomegaly", "pneumothorax"],
    "abdomen": ["free intraperitoneal air", "bowel obstruction", "a hepatic cyst", "splenomegaly", "ascites"],
    "brain": ["an acute infarct", "intracranial hemorrhage", "hydrocephalus", "a ring-enhancing lesion"],
    "spine": ["a compression fracture", "disc herniation", "a lytic lesion"],
    None: ["no abnormality", "a mass", "a cyst"],
}
LEAK = re.compile(r"(original|candidate|ground[- ]?truth|reference|hallucinated|dispreferred)\s*answer\s*\d*\s*:"
                  r"|^\s*-?\s*question\s*:|\btask\s*:|as an ai\b", re.I | re.M)


# how believable and clinically consequential a changed slot is, 0-10: heuristic severity tables, not
# medical judgment. "standard" follows the authors' released scores (a flipped yes/no, side, plane or
# modality 0.8-1.0); "lenient" and "strict" are two more judges' views, for a consensus among several.
SEVERITY = {
    "standard": {"laterality": 10, "yes/no": 9, "finding": 9, "modality": 9, "negation": 8, "location": 8,
                 "organ": 7, "size": 7, "status": 7, "character": 8},
    "lenient": {"laterality": 8, "yes/no": 8, "finding": 8, "modality": 7, "negation": 7, "location": 6,
                "organ": 6, "size": 5, "status": 6, "character": 5},
    "strict": {"laterality": 10, "yes/no": 10, "finding": 10, "modality": 9, "negation": 9, "location": 9,
               "organ": 8, "size": 8, "status": 8, "character": 7},
}


def rule_score(question, truth, answer, severity="standard"):
    """0-10 clinical relevance of a dispreferred `answer` (heuristic stand-in, not a medical judgment).

    0   empty, leaked prompt scaffolding, or the ground truth itself (same words or same yes/no)
    1   gibberish, copied question text, off-topic (no shared or medical words), or an answer that
        contains the ground truth and changes no clinical slot (it is probably right)
    2   a different organ system from the question's
    3-10 on the question's topic: the SEVERITY of the most consequential clinical slot it changes
        (side, yes/no, finding, modality, negation, location, organ, size, status, character; 6 when
        none), -1 if a sentence (over 3 words) shares no word with the question, -1 if it is far longer
        than the ground truth (its style gives it away)."""
    a, t, q = words(answer), words(truth), words(question)
    if not a or LEAK.search(answer):
        return 0
    if a == t or (polarity(truth) and polarity(answer) == polarity(truth)):
        return 0
    if is_gibberish(answer):
        return 1
    if len(a) >= 0.8 * len(q) and sum(x in q for x in a) >= 0.9 * len(a):
        return 1  # copies the question back
    content = lambda ws: {x for x in ws if x not in COMMON and x not in NEGATIONS}
    ca, ct, cq = content(a), content(t), content(q)
    flipped = polarity(truth) is not None and polarity(answer) not in (None, polarity(truth))
    medical = {x for x in ca if x in MEDICAL}
    if not flipped and not (ca & (cq | ct)) and not medical:
        return 1  # off-topic
    sys_a = {SYSTEM_OF[x] for x in a if x in SYSTEM_OF}
    sys_ref = {SYSTEM_OF[x] for x in q + t if x in SYSTEM_OF}
    if sys_a and sys_ref and not (sys_a & sys_ref):
        return 2  # wrong organ system
    sa, st = slot_values(answer), slot_values(truth)
    changed = [s for s in SLOTS if sa[s] and st[s] and sa[s] != st[s]]
    changed += ["yes/no"] * flipped + ["negation"] * (bool(set(a) & NEGATIONS) != bool(set(t) & NEGATIONS))
    if not changed and ct and ct <= set(a):
        return 1  # says the ground truth and changes nothing clinical
    table = SEVERITY[severity]
    score = max((table[s] for s in changed), default=6)
    score -= (0 if ca & cq or flipped or len(a) <= 3 else 1) + (0 if len(a) <= max(3 * len(t), 20) else 1)
    return max(3, min(score, 10))


def is_gibberish(text):
    w = words(text)
    known = [t for t in w if t in COMMON or t in MEDICAL or t in NEGATIONS or t.isdigit()]
    vowel_less = [t for t in w if len(t) > 3 and not re.search(r"[aeiouy]", t)]
    return not w or (len(known) / len(w) < 0.25 and len(vowel_less) > 0) or len(known) == 0 and len(w) > 2


def inject_hallucination(question, truth, seed=0):
    """A deterministic believable wrong answer: one clinically confusable swap (laterality, finding,
    location, size, yes/no, modality, ...) chosen by `seed` among those that change the text; else a
    negation flip; else a confusable finding in place of the answer. Never equal to `truth`."""
    rng, truth = random.Random(seed), truth.strip()
    if polarity(truth):  # a closed answer: flip the leading yes/no and keep the rest
        return re.sub(r"^(yes|no)\b", lambda m: _same_case(m.group(1), {"yes": "no", "no": "yes"}[m.group(1).lower()]),
                      truth, flags=re.I)
    options = []
    for x, y in SWAPS:
        for old, new in ((x, y), (y, x)):
            out = _replace_word(truth, old, new)
            if out != truth and words(out) != words(truth):
                options.append(out)
    if options:
        return rng.choice(sorted(set(options))).strip()
    if re.search(r"\b(no|not|without)\b", truth, re.I):
        out = re.sub(r"\b(no|not|without)\s+", "", truth, count=1, flags=re.I).strip()
        if words(out) != words(truth) and out:
            return _same_case(truth, out)
    systems = sorted({SYSTEM_OF[x] for x in words(question) + words(truth) if x in SYSTEM_OF})
    choices = [f for f in FALLBACK_FINDINGS[systems[0] if systems else None] if words(f) != words(truth)]
    return _same_case(truth, rng.choice(choices))


def _replace_word(text, old, new):
    def repl(m):
        w = m.group(0)
        return new.capitalize() if w[0].isupper() else new
    return re.sub(rf"\b{re.escape(old)}\b", repl, text, flags=re.I)


def rule_edit(question, truth, answer):
    """The offline editor of FiRe-MPO: the smallest correction of `answer` towards `truth`, keeping
    every other word. returns (edited text, how), or (None, 'right') when the answer is already right
    (same words; the same yes/no of a closed answer; or all of the truth's content with no wrong slot).
    A wrong bare yes/no is flipped; each wrong slot value (side, location, size, finding, modality, ...) is
    swapped for the truth's where the two have as many values; an answer with nothing to swap is
    replaced by the ground truth (not minimal, said in `how`). A list of findings ("nodule and mass") keeps
    its right items, drops the wrong ones and adds the missing ones; a report of several sentences is
    edited sentence by sentence (`edit_sentences`)."""
    a, t = words(answer), words(truth)
    if not a:
        return truth, "rewritten: empty answer"
    if a == t:
        return None, "right"
    if len(sentences(truth)) > 1 or len(sentences(answer)) > 1:
        return edit_sentences(truth, answer)
    listed = edit_finding_list(truth, answer)
    if listed:
        return listed
    if t in (["yes"], ["no"]):  # a closed question
        if polarity(answer) == t[0]:
            return None, "right"
        if a in (["yes"], ["no"]):
            return re.sub(r"^\s*(yes|no)\b", lambda m: _same_case(m.group(1), t[0]), answer, count=1,
                          flags=re.I), "yes/no flipped"
        return truth, "rewritten: a closed answer with more than yes/no"  # "Yes, it is enlarged" cannot be flipped alone
    edited, swapped, sa, st = answer, [], slot_values(answer), slot_values(truth)
    for slot in SLOTS:
        if slot == "organ":
            continue
        wrong, right = sorted(sa[slot] - st[slot]), sorted(st[slot] - sa[slot])
        if wrong and len(wrong) == len(right):
            for old, new in zip(wrong, right):
                spelled = re.search(rf"\b{re.escape(new)}\b", truth, re.I)  # the truth's own spelling ("MRI")
                new_text = spelled.group(0) if spelled else new
                edited = re.sub(rf"\b{re.escape(old)}\b", lambda m: new_text.capitalize()
                                if m.group(0)[0].isupper() and new_text.islower() else new_text, edited, flags=re.I)
                swapped.append(f"{old} -> {new}")
    content = {x for x in t if x not in COMMON}
    if swapped and content <= set(words(edited)):
        return edited, "swapped " + ", ".join(swapped)
    if not swapped and content and content <= set(a):
        return None, "right"
    return truth, "rewritten: no slot to swap"


def slot_values(text):
    w = set(words(text))
    return {slot: w & set(vocab.split()) for slot, vocab in SLOTS.items()}


def edit_sentences(truth, answer):
    """A report edited sentence by sentence: each sentence of the answer is kept when the truth has it,
    replaced by the truth's closest sentence when the two share most words (a corrected statement),
    dropped when it matches none (a statement the truth does not make), and the truth's sentences that
    no answer sentence matched are added at the end."""
    truth_s, used, out, changes = sentences(truth), set(), [], []
    for sent in sentences(answer):
        ratios = [(difflib.SequenceMatcher(None, words(sent), words(t)).ratio(), i) for i, t in enumerate(truth_s)
                  if i not in used]
        best, i = max(ratios, default=(0.0, None))
        if best == 1.0:
            out.append(sent)
        elif best >= 0.5:
            out.append(truth_s[i])
            changes.append("corrected")
        else:
            changes.append("dropped")
            continue
        used.add(i)
    missing = [t for i, t in enumerate(truth_s) if i not in used]
    changes += ["added"] * len(missing)
    if not changes:
        return None, "right"
    counts = {c: changes.count(c) for c in ("corrected", "dropped", "added") if c in changes}
    return " ".join(out + missing), "sentences " + ", ".join(f"{k} {v}" for k, v in counts.items())


def sentences(text):
    return [x.strip() for x in re.split(r"(?<=[.!?])\s+", text.strip()) if x.strip()]


def edit_finding_list(truth, answer):
    """'nodule and mass' style answers: (edited, how) keeping the answer's right findings, dropping its
    wrong ones and adding the missing ones, or None when either is not such a list."""
    split = lambda text: [x.strip() for x in re.split(r"\s+and\s+|,\s*", text.strip().rstrip(".")) if x.strip()]
    finding = set(SLOTS["finding"].split()) | {"pleural"}
    items_t, items_a = split(truth), split(answer)
    if not all(set(words(x)) & finding and not set(words(x)) & NEGATIONS for x in items_t + items_a):
        return None
    keep = [x for x in items_a if words(x) in [words(y) for y in items_t]]
    add = [y for y in items_t if words(y) not in [words(x) for x in keep]]
    if not add and len(keep) == len(items_a):
        return None
    return " and ".join(keep + add), f"findings kept {len(keep)}, dropped {len(items_a) - len(keep)}, added {len(add)}"


def _same_case(model, text):
    """`text` with its first letter upper-case iff `model`'s is (so style gives nothing away)."""
    return (text[0].upper() if model[:1].isupper() else text[0].lower()) + text[1:] if text else text


def clean_answer(text):
    """Strip a leading 'Answer:' label; return None if the text carries prompt scaffolding
    (e.g. 'Original Answer:', 'Candidate Answer1:', 'Question:'), as in leaked LLM output."""
    text = re.sub(r"^\s*(hallucinated\s+)?answer\s*:\s*", "", text.strip(), flags=re.I).strip().strip('"')
    if not text or LEAK.search(text):
        return None
    return text


def edit_kind(answer, edited, truth):
    """'minimal' when the edit changes only what is wrong: every content word it removes is absent from
    the truth, every content word it adds is in the truth, and it keeps at least half of the answer's
    words (an answer of up to 3 words may be replaced whole); else 'rewritten'. With truth "right upper":
    'left upper' -> 'right upper' is minimal; 'there is a mass in the left upper zone' -> 'right upper'
    and anything -> 'the lungs are clear' are rewritten. (Content words: not in COMMON or NEGATIONS.)"""
    a, e, t = words(answer), words(edited), set(words(truth))
    content = lambda ws: {w for w in ws if w not in COMMON and w not in NEGATIONS}
    kept = sum(i2 - i1 for tag, i1, i2, _, _ in difflib.SequenceMatcher(None, a, e, autojunk=False).get_opcodes()
               if tag == "equal")
    removed, added = content(set(a) - set(e)), content(set(e) - set(a))
    if removed & t or added - t or (len(a) > 3 and kept < len(a) / 2):
        return "rewritten"
    return "minimal"


def polarity(text):
    w = words(text)
    return w[0] if w and w[0] in ("yes", "no") else None


def words(text):
    """Lower-case word tokens; hyphens and punctuation split words ("T1-weighted" -> t1 weighted)."""
    return re.findall(r"[a-z0-9]+", text.lower().replace("x-ray", "xray"))
