"""Clinical-relevance scoring: judges, the chained Med-LLM consensus, and Strategy 1's judge work.

MMedPO weights each text preference pair by how clinically relevant its dispreferred answer is:
several medical LLMs score it in turn, each seeing the previous score and either agreeing or
proposing its own, until all agree (paper Sec. 3.2.1, App. B: at most 5 rounds, else the mean).
A strong LLM also picks, among answers sampled from the target model, the one that most clearly
contradicts the ground truth, or writes a believable hallucination when none does.

Judges: `HTTPJudge` talks to any OpenAI-compatible server (vLLM, Ollama, llama.cpp, TGI, OpenAI);
`RuleJudge` is the offline default, a documented heuristic stand-in (not a medical judgment).

    python score.py --pairs out/pairs/mmedpo.jsonl --out out/scores.jsonl                  # rule judge
    python score.py --pairs out/pairs/mmedpo.jsonl --out out/scores.jsonl --workers 8 \
        --judge med42=http://localhost:8000/v1,model=m42-health/Llama3-Med42-8B \
        --judge biomistral=http://localhost:8001/v1,model=BioMistral/BioMistral-7B

requests + stdlib only. Tests:  python -m pytest -q tests/test_score.py
"""
import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import random
import re
import sys
import threading
import time

PROMPT_VERSION = "v3"  # part of the cache key: change it when a prompt or the consensus rule changes


class JudgeError(RuntimeError):
    """A judge could not be reached after all retries (the pair is recorded as failed)."""


class JudgeAuthError(JudgeError):
    """The server refused the key (HTTP 401/403): no pair can succeed, so scoring stops at once."""


# -----------------------------------------------------------------------------
# judges: callables messages -> text

class HTTPJudge:
    """A model behind an OpenAI-compatible `POST {base_url}/chat/completions`.

    The API key is read from the environment variable named `key_env` at call time and only ever
    goes into the Authorization header; it is scrubbed from any error text."""

    def __init__(self, name, base_url, model, key_env=None, max_tokens=64, timeout=60.0,
                 max_retries=4, backoff=1.0, max_backoff=30.0):
        self.name, self.model, self.key_env = name, model, key_env
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.max_tokens, self.timeout = max_tokens, timeout
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff

    def _scrub(self, text):
        key = os.environ.get(self.key_env, "") if self.key_env else ""
        return text.replace(key, "***") if key else text

    def __call__(self, messages):
        import requests
        headers = {"Content-Type": "application/json"}
        if self.key_env:
            key = os.environ.get(self.key_env)
            if not key:
                raise JudgeError(f"{self.name}: environment variable {self.key_env} is not set")
            headers["Authorization"] = f"Bearer {key}"
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        reason = ""
        for attempt in range(self.max_retries + 1):
            wait = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random())  # jitter
            try:
                r = requests.post(self.url, json=body, headers=headers, timeout=self.timeout)
            except requests.RequestException as e:  # connection errors, timeouts, a reset in mid-body
                reason = f"{type(e).__name__} on {self.url}"
            else:
                # scrub first, then cut: a cut made first could leave most of an echoed key behind
                text = self._scrub(r.text)[:200]
                if r.status_code == 200:
                    try:
                        return r.json()["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError):  # a half-written reply: ask again
                        reason = f"malformed reply from {self.url}: {text!r}"
                        if attempt < self.max_retries:
                            time.sleep(wait)
                        continue
                reason = f"HTTP {r.status_code} from {self.url}: {text!r}"
                if r.status_code in (401, 403):
                    raise JudgeAuthError(f"{self.name}: authentication failed, {reason}" +
                                         (f"; check the key in ${self.key_env}" if self.key_env else
                                          "; this server wants a key: add key_env=VAR to the judge spec"))
                if r.status_code == 429 and r.headers.get("Retry-After", "").strip().isdigit():
                    wait = min(self.max_backoff, float(r.headers["Retry-After"]))
                elif r.status_code != 429 and r.status_code < 500:
                    break  # 4xx other than 429 will not get better by asking again
            if attempt < self.max_retries:
                time.sleep(wait)
        raise JudgeError(f"{self.name}: gave up after {attempt + 1} attempts: {reason}")


class RuleJudge:
    """Offline stand-in for the Med-LLM judges: a deterministic heuristic, not a medical judgment.

    It reads the same prompts the LLM judges get (the `Task:` line and the labelled fields) and
    answers in the same formats, so the consensus, selection and injection code paths are the ones
    used with real judges. Scoring rules are in `rule_score`; injection in `inject_hallucination`.
    It agrees with a previous score within 1 point."""

    def __init__(self, name="rule", severity="standard"):
        if severity not in SEVERITY:
            raise ValueError(f"unknown severity table {severity!r}: {', '.join(SEVERITY)}")
        self.name, self.model, self.severity = name, f"rule-v2-{severity}", severity

    def __call__(self, messages):
        text = messages[-1]["content"]
        f = dict(re.findall(r"^([A-Za-z][\w -]*?): ?(.*)$", text, flags=re.M))
        task = f.get("Task")
        if task == "score":
            own = rule_score(f["Question"], f["Ground-truth answer"], f["Dispreferred answer"], self.severity)
            prev = f.get("Previous score")
            if prev is not None and abs(int(prev) - own) <= 1:
                return json.dumps({"agree": True, "score": int(prev)})
            return json.dumps({"agree": False, "score": own})
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
# the rule judge's heuristics (vocabulary of chest/abdomen/brain/spine radiology)

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


def words(text):
    """Lower-case word tokens; hyphens and punctuation split words ("T1-weighted" -> t1 weighted)."""
    return re.findall(r"[a-z0-9]+", text.lower().replace("x-ray", "xray"))


def polarity(text):
    w = words(text)
    return w[0] if w and w[0] in ("yes", "no") else None


def is_gibberish(text):
    w = words(text)
    known = [t for t in w if t in COMMON or t in MEDICAL or t in NEGATIONS or t.isdigit()]
    vowel_less = [t for t in w if len(t) > 3 and not re.search(r"[aeiouy]", t)]
    return not w or (len(known) / len(w) < 0.25 and len(vowel_less) > 0) or len(known) == 0 and len(w) > 2


def slot_values(text):
    w = set(words(text))
    return {slot: w & set(vocab.split()) for slot, vocab in SLOTS.items()}


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


def _same_case(model, text):
    """`text` with its first letter upper-case iff `model`'s is (so style gives nothing away)."""
    return (text[0].upper() if model[:1].isupper() else text[0].lower()) + text[1:] if text else text


def _replace_word(text, old, new):
    def repl(m):
        w = m.group(0)
        return new.capitalize() if w[0].isupper() else new
    return re.sub(rf"\b{re.escape(old)}\b", repl, text, flags=re.I)


def inject_hallucination(question, truth, seed=0):
    truth = truth.strip()
    return _inject(question, truth, seed)


def _inject(question, truth, seed):
    """A deterministic believable wrong answer: one clinically confusable swap (laterality, finding,
    location, size, yes/no, modality, ...) chosen by `seed` among those that change the text; else a
    negation flip; else a confusable finding in place of the answer. Never equal to `truth`."""
    rng = random.Random(seed)
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


def rule_edit(question, truth, answer):
    """The offline editor of FiRe-MPO: the smallest correction of `answer` towards `truth`, keeping
    every other word. returns (edited text, how), or (None, 'right') when the answer is already right
    (same words; the same yes/no of a closed answer; or all of the truth's content with no wrong slot).
    A wrong bare yes/no is flipped; each wrong slot value (side, location, size, finding, modality, ...) is
    swapped for the truth's where the two have as many values; an answer with nothing to swap is
    replaced by the ground truth (not minimal, said in `how`)."""
    a, t = words(answer), words(truth)
    if not a:
        return truth, "rewritten: empty answer"
    if a == t:
        return None, "right"
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


def edit_answer(judge, question, truth, answer):
    """One minimal edit by `judge` (an LLM, or the RuleJudge, which applies `rule_edit`). A reply that
    leaks scaffolding, is empty or is unreadable falls back to the rule editor, said in `how`.
    returns (edited text, or None when the answer is already right, how)."""
    lines = ["Task: edit", f"Question: {_one_line(question)}", f"Ground-truth answer: {_one_line(truth)}",
             f"Answer: {_one_line(answer)}"]
    reply = judge([{"role": "system", "content": SYSTEM_EDIT}, {"role": "user", "content": "\n".join(lines)}])
    if reply.strip().upper().strip(".\"") == "UNCHANGED":
        return None, f"right, says {judge.name}"
    text = clean_answer(reply)
    if text is None:
        edited, how = rule_edit(question, truth, answer)
        return edited, f"rule editor ({judge.name}'s reply unusable): {how}"
    if words(text) == words(answer):
        return None, f"right, says {judge.name}"
    return text, f"edited by {judge.name}"


def clean_answer(text):
    """Strip a leading 'Answer:' label; return None if the text carries prompt scaffolding
    (e.g. 'Original Answer:', 'Candidate Answer1:', 'Question:'), as in leaked LLM output."""
    text = re.sub(r"^\s*(hallucinated\s+)?answer\s*:\s*", "", text.strip(), flags=re.I).strip().strip('"')
    if not text or LEAK.search(text):
        return None
    return text


# -----------------------------------------------------------------------------
# prompts and reply parsing

SYSTEM_SCORE = (
    "You are a board-certified radiologist reviewing a WRONG answer to a question about a medical image. "
    "Rate from 0 to 10 how clinically relevant and believable the wrong answer is. 10: a plausible, "
    "clinically meaningful error a clinician could make (wrong finding, side, location, size, presence). "
    "0: trivially wrong (off-topic, wrong organ system, gibberish, empty, or the same as the ground truth). "
    'Reply with JSON only: {"agree": true or false, "score": integer 0-10}.')
SYSTEM_SELECT = (
    "You are a radiologist. Among candidate answers to a question about a medical image, pick the one "
    "that most clearly contradicts the ground-truth answer in a clinically meaningful way. "
    'Reply with JSON only: {"choice": candidate number} or {"choice": "none"} if none contradicts it.')
SYSTEM_EDIT = (
    "You are a radiologist correcting a model's answer to a question about a medical image, given the ground "
    "truth. Change ONLY the clinically wrong words (finding, side, location, size, presence, yes/no, modality) "
    "and keep every other word exactly as it is. If the answer is already right, reply UNCHANGED. "
    "Reply with the corrected answer text only.")
SYSTEM_INJECT = (
    "You are a radiologist writing test material. Write ONE believable but wrong answer to the question: "
    "change one clinically meaningful detail of the ground truth (finding, side, location, size, presence, "
    "yes/no), keep its length and style. Reply with the answer text only.")


def _one_line(text):
    return " ".join(str(text).split())


def score_messages(question, truth, rejected, previous=None):
    lines = ["Task: score", f"Question: {_one_line(question)}", f"Ground-truth answer: {_one_line(truth)}",
             f"Dispreferred answer: {_one_line(rejected)}"]
    if previous is None:
        lines.append("Give your score.")
    else:
        lines += [f"Previous score: {previous}",
                  f'If you agree, reply {{"agree": true, "score": {previous}}}; otherwise give your own score.']
    return [{"role": "system", "content": SYSTEM_SCORE}, {"role": "user", "content": "\n".join(lines)}]


def parse_score(text, previous=None):
    """(score, agreed) from a judge's reply, or (None, False) if unusable.
    JSON {"agree": ..., "score": ...} first, then the first integer in 0..10, then a bare 'agree'."""
    m = re.search(r"\{.*?\}", text, re.S)
    if m:
        try:
            obj = json.loads(m.group(0))
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            agreed = obj.get("agree") is True and previous is not None
            score = previous if agreed and obj.get("score") is None else obj.get("score")
            if isinstance(score, str) and score.strip().isdigit():
                score = int(score)
            if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score) \
                    and score == int(score) and 0 <= score <= 10:
                return int(score), agreed and int(score) == previous
            return None, False
    for n in re.findall(r"-?\d+(?:\.\d+)?", text):
        if re.fullmatch(r"\d+", n) and 0 <= int(n) <= 10:
            return int(n), previous is not None and int(n) == previous
    if previous is not None and re.search(r"\bagree", text, re.I) and not re.search(r"disagree", text, re.I):
        return previous, True
    return None, False


def ask_score(judge, question, truth, rejected, previous=None):
    """One judge turn: ask, retry once with a corrective message if the reply is unusable.
    returns a history entry {judge, score, agreed, abstained, reply}."""
    messages = score_messages(question, truth, rejected, previous)
    reply = judge(messages)
    score, agreed = parse_score(reply, previous)
    if score is None:
        messages = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content":
                               'Your reply could not be read. Reply with JSON only: {"agree": true or false, '
                               '"score": integer from 0 to 10}.'}]
        reply = judge(messages)
        score, agreed = parse_score(reply, previous)
    return {"judge": judge.name, "score": score, "agreed": agreed, "abstained": score is None,
            "reply": reply[:200]}


def consensus(judges, question, truth, rejected, rounds=5):
    """Chained consensus (paper Sec. 3.2.1): judges take turns in a fixed, cycling order; each sees
    the last score given and agrees (adopts it) or proposes its own. The walk stops at consensus, when
    one full cycle (the last g turns) gave the same score from every judge that answered (the last g
    scores of the history S are equal when nobody abstained), or after `rounds` cycles. Either way the
    score is the mean of S, as the paper: "iterate until a consensus is reached or the maximum number
    of rounds is met, then compute the average s = sum s_i / |S|". Abstentions stay out of S.
    Example, two judges: 7, then 5, then 5 (agreed) -> consensus, score (7 + 5 + 5) / 3 = 5.67.

    returns {score (float or None if every turn abstained), consensus (bool), history [turn dicts]}.
    Raises JudgeError if a judge cannot be reached."""
    g, history, scores = len(judges), [], []
    if g == 0:
        raise ValueError("consensus needs at least one judge")
    agreed = False
    for turn in range(rounds * g):
        entry = ask_score(judges[turn % g], question, truth, rejected, scores[-1] if scores else None)
        history.append(entry)
        if entry["abstained"]:
            continue
        scores.append(entry["score"])
        cycle = [h["score"] for h in history[-g:] if not h["abstained"]]
        if turn >= g - 1 and len(set(cycle)) == 1:
            agreed = True
            break
    return {"score": sum(scores) / len(scores) if scores else None, "consensus": agreed, "history": history}


def select_dispreferred(judge, question, truth, candidates):
    """Index of the candidate that most clearly contradicts the ground truth, or None."""
    lines = ["Task: select", f"Question: {_one_line(question)}", f"Ground-truth answer: {_one_line(truth)}"]
    lines += [f"Candidate {i}: {_one_line(c)}" for i, c in enumerate(candidates, 1)]
    reply = judge([{"role": "system", "content": SYSTEM_SELECT}, {"role": "user", "content": "\n".join(lines)}])
    m = re.search(r'"?choice"?\s*:\s*"?(\w+)', reply) or re.search(r"\b(\d+|none)\b", reply, re.I)
    if m and m.group(1).isdigit() and 1 <= int(m.group(1)) <= len(candidates):
        return int(m.group(1)) - 1
    return None


def write_hallucination(judge, question, truth, seed=0):
    """A believable wrong answer from the judge, cleaned of leaked scaffolding; falls back to the rule
    injector if the judge's text leaks, is empty, or equals the ground truth.
    returns (text, provenance)."""
    lines = ["Task: inject", f"Question: {_one_line(question)}", f"Ground-truth answer: {_one_line(truth)}",
             f"Seed: {seed}"]
    reply = judge([{"role": "system", "content": SYSTEM_INJECT}, {"role": "user", "content": "\n".join(lines)}])
    text = clean_answer(reply)
    if text is None or words(text) == words(truth):
        return inject_hallucination(question, truth, seed), f"rule-injector (judge {judge.name} reply unusable)"
    return text, f"injected by {judge.name}"


# -----------------------------------------------------------------------------
# many pairs: thread pool, JSONL cache, progress

def pair_key(pair, judges, rounds=5):
    """The cache key: what is scored, by whom, under which prompts and how many consensus rounds."""
    blob = json.dumps([question_of(pair), pair.get("chosen"), pair.get("rejected"),
                       [(j.name, j.model) for j in judges], rounds, PROMPT_VERSION])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load_cache(path):
    """{key: record} from a JSONL cache. A torn last line (crash mid-write) is cut off the file."""
    cache = {}
    if not os.path.exists(path):
        return cache
    with open(path, "rb") as f:
        data = f.read()
    good_end = 0
    for line in data.splitlines(keepends=True):
        try:
            rec = json.loads(line)
            cache[rec["key"]] = rec
        except (ValueError, KeyError):
            if line.endswith(b"\n"):
                print(f"score: skipping an unreadable line in {path}", file=sys.stderr)
            else:
                break  # torn tail
        good_end += len(line)
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return cache


def question_of(pair):
    return (pair.get("question") or pair.get("prompt", "")).replace("<image>", "").strip()


def run_cached(keys, work, cache_path=None, workers=4, log=print, what="scored"):
    """Run work(i) -> {status, ...} for every i whose key is not in the JSONL cache, `workers` at a time.
    Every finished result (status other than 'failed') is appended to the cache at once and never
    asked again. A failure of one item (a judge unreachable, anything unexpected) costs only that item:
    it is recorded as failed with its reason, and asked again on the next run. An authentication
    failure stops the work at once: items not yet asked are recorded as failed, every finished result
    stays in the cache, and JudgeAuthError is raised at the end. returns the results in order."""
    cache = load_cache(cache_path) if cache_path else {}
    todo = [i for i, k in enumerate(keys) if k not in cache]
    results = {i: cache[k] for i, k in enumerate(keys) if k in cache}
    lock, t0, done, failed, auth = threading.Lock(), time.time(), 0, 0, []
    if cache_path:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    out = open(cache_path, "a") if cache_path else None

    def guarded(i):
        if auth:
            return i, {"status": "failed", "reason": f"not asked: {auth[0]}", "key": keys[i]}
        try:
            r = work(i)
        except Exception as e:  # one item's failure, whatever it is, costs only that item
            if isinstance(e, JudgeAuthError):
                auth.append(str(e))
            r = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:500]}
        return i, {**r, "key": keys[i]}

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        last = 0.0
        for fut in concurrent.futures.as_completed([pool.submit(guarded, i) for i in todo]):
            i, r = fut.result()
            with lock:
                results[i], done = r, done + 1
                failed += r["status"] == "failed"
                if out and r["status"] != "failed":  # failed items are asked again on the next run
                    out.write(json.dumps(r) + "\n")
                    out.flush()
            now = time.time()
            if now - last > 2 or done == len(todo):
                rate = done / max(now - t0, 1e-9)
                log(f"  {what} {done}/{len(todo)} | {rate:.1f}/s | ETA {(len(todo) - done) / rate:.0f}s | {failed} failed")
                last = now
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        if out:
            out.close()
    if auth:
        raise JudgeAuthError(f"{auth[0]} (stopped; {done - failed} finished results are kept in the cache)")
    return [results[i] for i in range(len(keys))]


def score_pairs(pairs, judges, cache_path=None, workers=4, rounds=5, log=print):
    """Score the rejected answer of each pair by consensus, `workers` pairs at a time (the judge order
    inside a pair is kept), through `run_cached` (cache, per-pair failures, authentication stop).
    returns a list of {key, score, consensus, history, status: scored|unscored|failed, reason}."""
    keys = [pair_key(p, judges, rounds) for p in pairs]

    def work(i):
        p = pairs[i]
        r = consensus(judges, question_of(p), p["chosen"], p["rejected"], rounds)
        return {**r, "status": "scored" if r["score"] is not None else "unscored"}

    cached = sum(1 for k in keys if k in load_cache(cache_path)) if cache_path else 0
    if len(pairs) > cached:
        log(f"scoring {len(pairs) - cached} pairs with {[j.name for j in judges]} ({cached} cached)")
    results = [{"score": None, "consensus": False, "history": [], **r}
               for r in run_cached(keys, work, cache_path, workers, log, "scored")]
    unscored, failed = (sum(r["status"] == s for r in results) for s in ("unscored", "failed"))
    if unscored or failed:
        log(f"  {unscored} pairs unscored (every judge abstained), {failed} failed: they get the neutral weight")
    return results


def edit_answers(items, answers, judge, cache_path=None, workers=4, log=print):
    """FiRe-MPO's minimal edits of many answers through `run_cached`: for each (item, answer), the
    judge's corrected answer. returns [{status: edited|right|failed, edited (text or None), how}]."""
    keys = [hashlib.sha256(json.dumps([it["question"], it["answer"], a, judge.name, judge.model,
                                       PROMPT_VERSION]).encode()).hexdigest()[:32] for it, a in zip(items, answers)]

    def work(i):
        text, how = edit_answer(judge, items[i]["question"], items[i]["answer"], answers[i])
        return {"status": "right" if text is None else "edited", "edited": text, "how": how}
    return [{"edited": None, "how": r.get("reason", ""), **r} for r in run_cached(keys, work, cache_path, workers, log, "edited")]


def parse_judge(spec):
    """'NAME=URL,model=M,key_env=VAR' -> HTTPJudge; 'rule', 'rule:lenient' or 'rule:strict' -> a RuleJudge
    with that severity table (offline judges that disagree, for a consensus among several)."""
    if spec == "rule" or spec.startswith("rule:"):
        severity = spec.partition(":")[2] or "standard"
        if severity not in SEVERITY:
            raise argparse.ArgumentTypeError(f"--judge {spec!r}: severity tables are {', '.join(SEVERITY)}")
        return RuleJudge(f"rule-{severity}", severity)
    name, _, rest = spec.partition("=")
    url, *opts = rest.split(",")
    kw = dict(o.split("=", 1) for o in opts if "=" in o)
    if not name or not url.startswith("http") or "model" not in kw:
        raise argparse.ArgumentTypeError(f"--judge {spec!r}: expected NAME=URL,model=M[,key_env=VAR]")
    unknown = set(kw) - {"model", "key_env", "timeout", "max_tokens"}
    if unknown:
        raise argparse.ArgumentTypeError(f"--judge {spec!r}: unknown options {sorted(unknown)}")
    return HTTPJudge(name, url, kw["model"], kw.get("key_env"), int(kw.get("max_tokens", 64)),
                     float(kw.get("timeout", 60)))


def read_jsonl(path, log=None):
    """[(line number, record)] of a JSONL file of objects. A UTF-8 byte-order mark is allowed; a line
    that is not valid UTF-8, not JSON, or not a JSON object is reported as file:line and skipped.
    A missing file or a folder raises ValueError naming it."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file" + (" (it is a folder)" if os.path.isdir(path) else ""))
    records = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                log(f"{path}:{n}: skipped, not UTF-8 ({e})")
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                log(f"{path}:{n}: skipped, not JSON ({e})")
                continue
            if not isinstance(rec, dict):
                log(f"{path}:{n}: skipped, a JSON {type(rec).__name__} where an object was expected")
                continue
            records.append((n, rec))
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", required=True, help="preference pairs JSONL (prompt, chosen, rejected[, source])")
    ap.add_argument("--out", required=True, help="output JSONL: the pairs with score, status and history")
    ap.add_argument("--judge", action="append", type=parse_judge, default=[],
                    help="NAME=URL,model=M[,key_env=VAR]; repeat for several judges (order matters)")
    ap.add_argument("--workers", type=int, default=4, help="pairs scored concurrently")
    ap.add_argument("--rounds", type=int, default=5, help="consensus rounds before taking the mean")
    ap.add_argument("--cache", default=None, help="JSONL cache (default: OUT.cache.jsonl)")
    args = ap.parse_args(argv)
    if args.workers < 1 or args.rounds < 1:
        ap.error("--workers and --rounds must be >= 1")
    try:
        lines = read_jsonl(args.pairs)
    except ValueError as e:
        ap.error(f"--pairs {e}")
    text, others = [], []
    for n, p in lines:
        if p.get("source", "text") != "text":
            others.append(p)  # visual pairs: their score is the visual tool's confidence
        elif not all(isinstance(p.get(k), str) and p[k].strip() for k in ("chosen", "rejected")) or not question_of(p):
            print(f"{args.pairs}:{n}: skipped, a text pair needs prompt (or question), chosen and rejected text",
                  file=sys.stderr)
        else:
            text.append(p)
    if others:
        print(f"{len(others)} pairs that are not text pairs (e.g. visual) are written through with their own scores")
    judges = args.judge or [RuleJudge()]
    try:
        results = score_pairs(text, judges, args.cache or args.out + ".cache.jsonl", args.workers, args.rounds)
    except JudgeAuthError as e:
        sys.exit(f"score.py: {e}")
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        for p, r in zip(text, results):
            f.write(json.dumps({**p, "score": r["score"], "score_status": r["status"],
                                "score_history": r["history"], "score_reason": r.get("reason")}) + "\n")
        for p in others:
            f.write(json.dumps(p) + "\n")
    os.replace(tmp, args.out)
    counts = {s: sum(r["status"] == s for r in results) for s in ("scored", "unscored", "failed")}
    print(f"wrote {len(text) + len(others)} pairs to {args.out}: {counts['scored']} scored, {counts['unscored']} "
          f"unscored, {counts['failed']} failed, {len(others)} passed through")
    if counts["failed"]:
        sys.exit(f"score.py: {counts['failed']} pairs failed (reasons in {args.out}); run again to retry them")


if __name__ == "__main__":
    main()
