"""Clinical-relevance scoring (MMedPO Sec. 3.2): the chained Med-LLM consensus, and Strategy 1's judge work.

MMedPO weights each text preference pair by how clinically relevant its dispreferred answer is:
several medical LLMs score it in turn, each seeing the previous score and either agreeing or
proposing its own, until all agree or the rounds run out; the score is the mean of every score given
(paper Sec. 3.2.1: "iterate until a consensus is reached or the maximum number of rounds is met, then
compute the average"). A strong LLM also picks, among answers sampled from the target model, the one
that most clearly contradicts the ground truth, or writes a believable hallucination when none does;
for FiRe-MPO an editor corrects an answer minimally.

The file reads downward: the paper's steps (the prompts, the chained `consensus`, one judge turn and
the reply's parsing, select / inject / edit), then many pairs at once, then the judges. What makes it
survive real servers (the thread pool, the JSONL cache, the bounded HTTP judge, key scrubbing) is in
guard/judge.py; the offline default judge is world/rule_judge.py's `RuleJudge`, a documented heuristic
stand-in; the command line is lab/score_cli.py.

    python -c "import score; print(score.consensus([score.RuleJudge()], 'Is there a nodule?', 'yes', 'no'))"

Tests:  python -m pytest -q tests/method/test_consensus.py tests/guard
"""
import argparse
import hashlib
import json
import math
import re

from guard.judge import JudgeError, parse_http_judge, run_cached  # noqa: F401  (JudgeError: what a failed judge raises)
from world.rule_judge import RuleJudge, SEVERITY, clean_answer, edit_kind, inject_hallucination, polarity, rule_edit, words

PROMPT_VERSION = "v4"  # part of the cache key: change it when a prompt or the consensus rule changes


# -----------------------------------------------------------------------------
# the paper's scoring: every text pair scored by the chained consensus, one judge turn and its parsing

def score_pairs(pairs, judges, cache_path=None, workers=4, rounds=5, log=print):
    """Score the rejected answer of each pair by consensus, `workers` pairs at a time (the judge order
    inside a pair is kept), through `run_cached` (cache, per-pair failures, authentication stop).
    returns a list of {key, score, consensus, history, status: scored|unscored|failed, reason}."""
    keys = [pair_key(p, judges, rounds) for p in pairs]

    def work(i):
        p = pairs[i]
        r = consensus(judges, question_of(p), p["chosen"], p["rejected"], rounds)
        return {**r, "status": "scored" if r["score"] is not None else "unscored"}

    log(f"scoring {len(pairs)} pairs with {[j.name for j in judges]} (scores in the cache are reused)")
    results = [{"score": None, "consensus": False, "history": [], **r}
               for r in run_cached(keys, work, cache_path, workers, log, "scored")]
    unscored, failed = (sum(r["status"] == s for r in results) for s in ("unscored", "failed"))
    if unscored or failed:
        log(f"  {unscored} pairs unscored (every judge abstained), {failed} failed: they get the neutral weight")
    return results


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
    JSON {"agree": ..., "score": ...} first, then the one whole number in 0..10 of free text (a stated
    scale such as "(0-10)" or "/10" removed; two different numbers are ambiguous: unusable), then a bare
    'agree'. Never a score the reply does not give."""
    objects = []
    for m in re.finditer(r"\{.*?\}", text, re.S):
        try:
            objects.append(json.loads(m.group(0), object_pairs_hook=_unique_keys))
        except _DuplicateKey:
            return None, False                       # {"score": 3, "score": 9}: which one? a failed reply
        except (ValueError, RecursionError):
            continue
    objects = [o for o in objects if isinstance(o, dict)]
    if len(objects) > 1:
        return None, False                           # two JSON answers: ambiguous, a failed reply
    if objects:
        obj = objects[0]
        if isinstance(obj, dict):
            agreed = obj.get("agree") is True and previous is not None
            score = previous if agreed and obj.get("score") is None else obj.get("score")
            if isinstance(score, str) and score.strip().isdigit():
                score = int(score)
            if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score) \
                    and score == int(score) and 0 <= score <= 10:
                return int(score), agreed and int(score) == previous
            return None, False
    # free text ("I would rate this an 8", "Score (0-10): 9", "8/10"): the scale's own numbers go first;
    # one whole number in 0..10 is the score, several different ones are ambiguous (a failed reply)
    bare = re.sub(r"\(?\b0\s*(?:-|–|to)\s*10\b\)?|/\s*10\b|\bout of 10\b", " ", text, flags=re.I)
    numbers = {int(n) for n in re.findall(r"(?<![\d.-])\d+(?!\.?\d)", bare) if int(n) <= 10}
    if len(numbers) == 1:
        n = numbers.pop()
        return n, previous is not None and n == previous
    if numbers:
        return None, False
    if previous is not None and re.search(r"\bagree", text, re.I) and not re.search(r"disagree", text, re.I):
        return previous, True
    return None, False


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs):
    """json's object hook: a key given twice is an error, not the last value."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKey(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


# -----------------------------------------------------------------------------
# Strategy 1's judge work: select a sampled answer, or write a hallucination; FiRe-MPO's minimal edit

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


def edit_answers(items, answers, judge, cache_path=None, workers=4, log=print):
    """FiRe-MPO's minimal edits of many answers through `run_cached`: for each (item, answer), the
    judge's corrected answer. returns [{status: edited|right|failed, edited (text or None), how}]."""
    keys = [cache_key(it["question"], it["answer"], a, judge.name, judge.model) for it, a in zip(items, answers)]

    def work(i):
        text, how = edit_answer(judge, items[i]["question"], items[i]["answer"], answers[i])
        return {"status": "right" if text is None else "edited", "edited": text, "how": how}
    return [{"edited": None, "how": r.get("reason", ""), **r} for r in run_cached(keys, work, cache_path, workers, log, "edited")]


def edit_answer(judge, question, truth, answer):
    """One minimal edit by `judge` (an LLM, or the RuleJudge, which applies `rule_edit`). An LLM's reply
    must be what the rule editor gives by construction: clean text (no scaffolding), the truth's yes/no
    on a closed question, and a minimal edit of the answer (`rule_judge.edit_kind`), not a new text. A
    reply that fails a check falls back to the rule editor, and `how` says why ("rejected: ...").
    returns (edited text, or None when the answer is already right, how)."""
    lines = ["Task: edit", f"Question: {_one_line(question)}", f"Ground-truth answer: {_one_line(truth)}",
             f"Answer: {_one_line(answer)}"]
    reply = judge([{"role": "system", "content": SYSTEM_EDIT}, {"role": "user", "content": "\n".join(lines)}])
    if reply.strip().upper().strip(".\"") == "UNCHANGED":
        return None, f"right, says {judge.name}"
    text = clean_answer(reply)
    if isinstance(judge, RuleJudge):
        return text, rule_edit(question, truth, answer)[1]
    problem = ("empty or leaked scaffolding" if text is None else
               "the wrong yes/no" if polarity(truth) and polarity(text) != polarity(truth) else
               "not a minimal edit of the answer" if words(text) != words(answer) and edit_kind(answer, text, truth) != "minimal"
               else None)
    if problem:
        edited, how = rule_edit(question, truth, answer)
        return edited, f"rule editor ({judge.name}'s reply rejected: {problem}): {how}"
    if words(text) == words(answer):
        return None, f"right, says {judge.name}"
    return text, f"edited by {judge.name}"


# -----------------------------------------------------------------------------
# the prompts (their version is part of every cache key), the keys, the judges

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


def pair_key(pair, judges, rounds=5):
    """What is scored, by whom, under which prompts and how many consensus rounds."""
    return cache_key(question_of(pair), pair.get("chosen"), pair.get("rejected"), [(j.name, j.model) for j in judges],
                     rounds)


def cache_key(*parts):
    """The key of one cached result: a hash of everything it depends on (inputs, judges, prompt version)."""
    return hashlib.sha256(json.dumps([*parts, PROMPT_VERSION]).encode()).hexdigest()[:32]


def question_of(pair):
    return (pair.get("question") or pair.get("prompt", "")).replace("<image>", "").strip()


def _one_line(text):
    return " ".join(str(text).split())


def parse_judge(spec, flag="--judge"):
    """'rule', 'rule:lenient' or 'rule:strict' -> a RuleJudge with that severity table (offline judges with
    different views, for a consensus among several); 'NAME=URL,model=M[,key_env=VAR][,timeout=S][,max_tokens=N]'
    -> an HTTPJudge (guard/judge.py checks the spec). Anything else raises argparse.ArgumentTypeError naming `flag`."""
    if spec == "rule" or spec.startswith("rule:"):
        severity = spec.partition(":")[2] or "standard"
        if severity not in SEVERITY:
            raise argparse.ArgumentTypeError(f"{flag} {spec!r}: severity tables are {', '.join(SEVERITY)}")
        return RuleJudge(f"rule-{severity}", severity)
    return parse_http_judge(spec, flag)
