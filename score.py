"""Clinical-relevance scoring (MMedPO Sec. 3.2): the chained Med-LLM consensus, and Strategy 1's judge work.

MMedPO weights each text preference pair by how clinically relevant its dispreferred answer is:
several medical LLMs score it in turn, each seeing the previous score and either agreeing or
proposing its own, until all agree or the rounds run out; the score is the mean of every score given
(paper Sec. 3.2.1: "iterate until a consensus is reached or the maximum number of rounds is met, then
compute the average"). A strong LLM also picks, among answers sampled from the target model, the one
that most clearly contradicts the ground truth, or writes a believable hallucination when none does;
for FiRe-MPO an editor corrects an answer minimally.

The file reads downward, a function's helpers after it: the command line -> many pairs at once (thread
pool, JSONL cache, progress) -> the paper's steps: the chained `consensus`, one judge turn, its prompt
and the reply's parsing, select / inject / edit -> the judges behind an OpenAI-compatible server (vLLM,
Ollama, llama.cpp, TGI, OpenAI).
The offline default judge is `rule_judge.RuleJudge`, a documented heuristic stand-in.

    python score.py --pairs out/pairs/mmedpo.jsonl --out out/scores.jsonl                  # rule judge
    python score.py --pairs out/pairs/mmedpo.jsonl --out out/scores.jsonl --workers 8 \
        --judge med42=http://localhost:8000/v1,model=m42-health/Llama3-Med42-8B \
        --judge biomistral=http://localhost:8001/v1,model=BioMistral/BioMistral-7B

requests + stdlib + rule_judge. Tests:  python -m pytest -q tests/test_score.py tests/test_faults.py
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
import urllib.parse
from collections import namedtuple

from rule_judge import RuleJudge, SEVERITY, clean_answer, edit_kind, inject_hallucination, polarity, rule_edit, words

PROMPT_VERSION = "v4"  # part of the cache key: change it when a prompt or the consensus rule changes


class JudgeError(RuntimeError):
    """A judge could not give a usable reply after all retries (the pair is recorded as failed)."""


class JudgeAuthError(JudgeError):
    """The server refused the key (HTTP 401/403): no pair can succeed, so the work stops at once."""


class JudgeUnreachable(JudgeError):
    """No connection could be made to the server on any attempt."""


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
    args.cache = args.cache or args.out + ".cache.jsonl"
    same = lambda a, b: os.path.realpath(a) == os.path.realpath(b)
    for flag, path in (("--out", args.out), ("--cache", args.cache)):
        if same(path, args.pairs):
            ap.error(f"{flag} {path} is the input --pairs: it would be overwritten")
    if same(args.out, args.cache):
        ap.error(f"--out and --cache are the same file {args.out}")
    for flag, path in (("--out", args.out), ("--cache", args.cache)):
        why = guarded_output(path)
        if why:
            ap.error(f"{flag} {path}: {why}; an output must not replace another run's file")
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
        results = score_pairs(text, judges, args.cache, args.workers, args.rounds)
    except (JudgeAuthError, JudgeUnreachable) as e:
        sys.exit(f"score.py: {e}")
    tmp = os.path.join(os.path.dirname(os.path.abspath(args.out)),  # unique: never another file's name
                       f".{os.path.basename(args.out)}.{os.getpid()}.{random.getrandbits(32):08x}.tmp")
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


# -----------------------------------------------------------------------------
# many pairs at once: thread pool, JSONL cache, progress; and no output over another run's file

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


def edit_answers(items, answers, judge, cache_path=None, workers=4, log=print):
    """FiRe-MPO's minimal edits of many answers through `run_cached`: for each (item, answer), the
    judge's corrected answer. returns [{status: edited|right|failed, edited (text or None), how}]."""
    keys = [cache_key(it["question"], it["answer"], a, judge.name, judge.model) for it, a in zip(items, answers)]

    def work(i):
        text, how = edit_answer(judge, items[i]["question"], items[i]["answer"], answers[i])
        return {"status": "right" if text is None else "edited", "edited": text, "how": how}
    return [{"edited": None, "how": r.get("reason", ""), **r} for r in run_cached(keys, work, cache_path, workers, log, "edited")]


def pair_key(pair, judges, rounds=5):
    """What is scored, by whom, under which prompts and how many consensus rounds."""
    return cache_key(question_of(pair), pair.get("chosen"), pair.get("rejected"), [(j.name, j.model) for j in judges],
                     rounds)


def cache_key(*parts):
    """The key of one cached result: a hash of everything it depends on (inputs, judges, prompt version)."""
    return hashlib.sha256(json.dumps([*parts, PROMPT_VERSION]).encode()).hexdigest()[:32]


def question_of(pair):
    return (pair.get("question") or pair.get("prompt", "")).replace("<image>", "").strip()


def run_cached(keys, work, cache_path=None, workers=4, log=print, what="scored"):
    """Run work(i) -> {status, ...} for every i whose key is not in the JSONL cache, `workers` at a time.
    Every finished result (status other than 'failed') is appended to the cache at once and never
    asked again. A failure of one item (a bad reply, anything unexpected) costs only that item: it is
    recorded as failed with its reason, and asked again on the next run. The work stops at once when no
    item can succeed: a refused key (JudgeAuthError), or a server that could not be reached by any of
    the first `workers` items before one succeeded (JudgeUnreachable). Items not yet asked are then
    recorded as failed, every finished result stays in the cache, and the error is raised at the end.
    returns the results in order."""
    cache = load_cache(cache_path, log) if cache_path else {}
    todo = [i for i, k in enumerate(keys) if k not in cache]
    results = {i: cache[k] for i, k in enumerate(keys) if k in cache}
    t0, done, failed, stop, tally, lock = time.time(), 0, 0, [], {"ok": 0, "unreachable": 0}, threading.Lock()
    if cache_path:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    out = open(cache_path, "a") if cache_path else None

    def guarded(i):  # runs in a worker thread
        if stop:
            return i, {"status": "failed", "reason": f"not asked: {stop[0]}", "key": keys[i]}
        try:
            r = work(i)
        except Exception as e:  # one item's failure, whatever it is, costs only that item
            with lock:  # the tally decides whether every later item is skipped
                tally["unreachable"] += isinstance(e, JudgeUnreachable)
                if isinstance(e, JudgeAuthError) or (isinstance(e, JudgeUnreachable) and not tally["ok"]
                                                     and tally["unreachable"] >= min(workers, len(todo))):
                    stop.append(e)
            r = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:500]}
        else:
            with lock:
                tally["ok"] += 1
        return i, {**r, "key": keys[i]}

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        last = 0.0
        for fut in concurrent.futures.as_completed([pool.submit(guarded, i) for i in todo]):
            i, r = fut.result()
            results[i], done, failed = r, done + 1, failed + (r["status"] == "failed")
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
    if stop:
        raise type(stop[0])(f"{stop[0]} (stopped; {done - failed} finished results are kept in the cache)")
    return [results[i] for i in range(len(keys))]


def load_cache(path, log=None):
    """{key: record} from a JSONL cache. A line that is not a JSON object with a string `key` and
    `status` is reported as file:line and skipped (asked again); a torn last line (a crash mid-write)
    is cut off the file."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    cache = {}
    if not os.path.exists(path):
        return cache
    with open(path, "rb") as f:
        data = f.read()
    good_end = 0
    for n, line in enumerate(data.splitlines(keepends=True), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            if not line.endswith(b"\n"):
                break  # torn tail
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("key"), str) and isinstance(rec.get("status"), str):
            cache[rec["key"]] = rec
        elif line.strip():
            log(f"{path}:{n}: skipped, not a cache record (asked again)")
        good_end += len(line)
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return cache


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


RUN_LOCK = ".mmedpo-run.lock"  # the file a run holds locked in its folder (checkpoint.RunLock)


def guarded_output(path):
    """Why `path` (links resolved) must not be written by a tool's --out, or None: it lies in a run
    folder, an adapter or a model (their marker file in its folder or the one above), or another
    stage's key vouches for it (FILE.key.json beside it)."""
    real = os.path.realpath(path)
    if os.path.exists(real + ".key.json"):
        return f"a stage file ({real}.key.json vouches for its content)"
    for folder in (os.path.dirname(real), os.path.dirname(os.path.dirname(real))):   # its folder and the one above
        what = os.path.isdir(folder) and _project_folder(folder)
        if what:
            return f"it lies in {what} ({folder})"
    return None


def _project_folder(folder):
    """What project folder `folder` is (a run folder, an adapter, a model), or None."""
    has = lambda name: os.path.exists(os.path.join(folder, name))
    if has(RUN_LOCK) or has("metrics.json") and has("log.jsonl"):
        return "a run folder"
    if has("adapter_config.json"):
        return "an adapter"
    if has("config.json") and any(f.endswith((".safetensors", ".bin")) for f in os.listdir(folder)):
        return "a model"
    return None


# -----------------------------------------------------------------------------
# the paper's steps: the prompts, the chained consensus, one judge turn and its parsing, select / inject / edit

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


def _one_line(text):
    return " ".join(str(text).split())


# -----------------------------------------------------------------------------
# judges behind an OpenAI-compatible server

Retry = namedtuple("Retry", "max_retries backoff max_backoff", defaults=(4, 1.0, 30.0))  # seconds, doubled each try


MAX_REPLY_BYTES = 1 << 20  # a chat completion of a few tokens is a few kB; a larger reply is refused, not read


def parse_judge(spec, flag="--judge"):
    """'NAME=URL,model=M[,key_env=VAR][,timeout=S][,max_tokens=N]' -> HTTPJudge; 'rule', 'rule:lenient'
    or 'rule:strict' -> a RuleJudge with that severity table (offline judges with different views, for
    a consensus among several). Anything else raises argparse.ArgumentTypeError naming `flag`."""
    def bad(msg):
        return argparse.ArgumentTypeError(f"{flag} {spec!r}: {msg}")
    if spec == "rule" or spec.startswith("rule:"):
        severity = spec.partition(":")[2] or "standard"
        if severity not in SEVERITY:
            raise bad(f"severity tables are {', '.join(SEVERITY)}")
        return RuleJudge(f"rule-{severity}", severity)
    name, _, rest = spec.partition("=")
    url, *opts = rest.split(",")
    if any("=" not in o for o in opts):
        raise bad("options are key=value")
    kw = dict(o.split("=", 1) for o in opts)
    if not name or "model" not in kw or not kw["model"]:
        raise bad("expected NAME=URL,model=M[,key_env=VAR][,timeout=S][,max_tokens=N]")
    parts = urllib.parse.urlsplit(url)
    try:
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok or parts.netloc.endswith(":"):
        raise bad(f"{url!r} is not an http(s) URL with a host and a valid port")
    unknown = set(kw) - {"model", "key_env", "timeout", "max_tokens"}
    if unknown:
        raise bad(f"unknown options {sorted(unknown)}")
    try:
        timeout, max_tokens = float(kw.get("timeout", 60)), int(kw.get("max_tokens", 64))
    except ValueError:
        raise bad("timeout must be a number of seconds and max_tokens a whole number") from None
    if not math.isfinite(timeout) or timeout <= 0:
        raise bad(f"timeout={kw['timeout']} must be a finite number of seconds > 0")
    if max_tokens < 1:
        raise bad(f"max_tokens={kw['max_tokens']} must be >= 1")
    if "key_env" in kw and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", kw["key_env"]):
        raise bad(f"key_env={kw['key_env']!r} is not an environment variable name")
    return HTTPJudge(name, url, kw["model"], kw.get("key_env"), max_tokens, timeout)


class HTTPJudge:
    """A model behind an OpenAI-compatible `POST {base_url}/chat/completions`.

    The API key is read from the environment variable named `key_env` at call time and only ever
    goes into the Authorization header; it is scrubbed from any error text. One request is bounded in time
    and size, and never follows a redirect."""

    def __init__(self, name, base_url, model, key_env=None, max_tokens=64, timeout=60.0, retry=None):
        self.name, self.model, self.key_env = name, model, key_env
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.max_tokens, self.timeout = max_tokens, timeout
        self.max_retries, self.backoff, self.max_backoff = retry or Retry()

    def _key(self):
        return os.environ.get(self.key_env, "") if self.key_env else ""

    def _key_pieces(self):
        """Every piece of the key long enough to identify it (16 characters, or the whole of a shorter key):
        a reply that echoes most of a key leaks it as surely as one that echoes all of it."""
        key = self._key()
        w = min(len(key), 16)
        return [key[i:i + w] for i in range(len(key) - w + 1)] if key else []

    def _scrub(self, text):
        for piece in self._key_pieces():
            text = text.replace(piece, "***")
        return text

    def _post(self, body, headers):
        """(status, headers, text) of one POST, bounded in total time (`timeout` from the first byte sent to
        the last read) and in size (MAX_REPLY_BYTES); a redirect is never followed (the prompt holds the
        ground truth, and another host must not get it). Raises requests exceptions as requests does."""
        import requests
        deadline = time.monotonic() + self.timeout
        with requests.post(self.url, json=body, headers=headers, timeout=self.timeout, stream=True,
                           allow_redirects=False) as r:
            if r.is_redirect or 300 <= r.status_code < 400:
                return r.status_code, r.headers, f"redirect to {r.headers.get('Location', '?')} not followed"
            chunks, size = [], 0
            # read1 returns what has arrived (urllib3 2); a fixed-size read would wait for a trickle to fill it
            read = getattr(r.raw, "read1", None) or (lambda n: r.raw.read(64))
            while chunk := read(8192):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_REPLY_BYTES:
                    raise requests.RequestException(f"reply larger than {MAX_REPLY_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise requests.Timeout(f"reply not complete within {self.timeout}s")
            return r.status_code, r.headers, b"".join(chunks).decode(r.encoding or "utf-8", errors="replace")

    def __call__(self, messages):
        """The reply's text. A reply that is not a string, or that holds the API key (a server echoing
        the request), is unusable: asked again, then JudgeError. Errors never carry the key."""
        import requests
        headers = {"Content-Type": "application/json"}
        if self.key_env:
            if not self._key():
                raise JudgeError(f"{self.name}: environment variable {self.key_env} is not set")
            headers["Authorization"] = f"Bearer {self._key()}"
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        reason, connected = "", False
        for attempt in range(self.max_retries + 1):
            wait = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random())  # jitter
            try:
                status, reply_headers, raw = self._post(body, headers)
            except requests.ConnectionError as e:  # refused, unknown host, or a reset in mid-body
                reason = f"cannot connect to {self.url} ({type(e).__name__})"
            except requests.RequestException as e:  # timeouts, oversized replies, other failures of a reachable server
                reason, connected = f"{type(e).__name__} on {self.url}: {self._scrub(str(e))[:120]}", True
            else:
                connected = True
                # scrub first, then cut: a cut made first could leave most of an echoed key behind
                text = self._scrub(raw)[:200]
                if status == 200:
                    try:
                        content = json.loads(raw)["choices"][0]["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError):
                        content = None
                    if content is None or not isinstance(content, str):  # half-written, or JSON NaN
                        reason = f"malformed reply from {self.url}: {text!r}"
                    elif any(piece in content for piece in self._key_pieces()):
                        reason = f"the reply from {self.url} holds (part of) the API key: not used"
                    else:
                        return content
                    if attempt < self.max_retries:
                        time.sleep(wait)
                    continue
                reason = f"HTTP {status} from {self.url}: {text!r}"
                if status in (401, 403):
                    raise JudgeAuthError(f"{self.name}: authentication failed, {reason}" +
                                         (f"; check the key in ${self.key_env}" if self.key_env else
                                          "; this server wants a key: add key_env=VAR to the judge spec"))
                if status == 429 and reply_headers.get("Retry-After", "").strip().isdigit():
                    wait = min(self.max_backoff, float(reply_headers["Retry-After"]))
                elif status != 429 and status < 500:
                    break  # 4xx other than 429 will not get better by asking again
            if attempt < self.max_retries:
                time.sleep(wait)
        error = JudgeError if connected else JudgeUnreachable
        raise error(f"{self.name}: gave up after {attempt + 1} attempts: {reason}")


if __name__ == "__main__":
    main()
