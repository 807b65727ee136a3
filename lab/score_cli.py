"""score.py's command line: score a pairs file's text pairs by the chained consensus of one or more judges.

    python -m lab.score_cli --pairs out/pairs/mmedpo.jsonl --out out/scores.jsonl                  # rule judge
    python -m lab.score_cli --pairs out/pairs/mmedpo.jsonl --out out/scores.jsonl --workers 8 \\
        --judge med42=http://localhost:8000/v1,model=m42-health/Llama3-Med42-8B \\
        --judge biomistral=http://localhost:8001/v1,model=BioMistral/BioMistral-7B

Visual pairs are written through with their own scores (the visual tool's confidence). A pair that fails
is written with its reason and asked again by the next run; finished scores stay in the cache.

Tests:  python -m pytest -q tests/guard/test_judge.py
"""
import argparse
import json
import os
import random
import sys

import score
from guard.checkpoint import guarded_output, read_jsonl
from guard.judge import JudgeAuthError, JudgeUnreachable


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lab.score_cli", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", required=True, help="preference pairs JSONL (prompt, chosen, rejected[, source])")
    ap.add_argument("--out", required=True, help="output JSONL: the pairs with score, status and history")
    ap.add_argument("--judge", action="append", type=score.parse_judge, default=[],
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
        elif not all(isinstance(p.get(k), str) and p[k].strip() for k in ("chosen", "rejected")) or not score.question_of(p):
            print(f"{args.pairs}:{n}: skipped, a text pair needs prompt (or question), chosen and rejected text",
                  file=sys.stderr)
        else:
            text.append(p)
    if others:
        print(f"{len(others)} pairs that are not text pairs (e.g. visual) are written through with their own scores")
    judges = args.judge or [score.RuleJudge()]
    try:
        results = score.score_pairs(text, judges, args.cache, args.workers, args.rounds,
                                     log=lambda msg: print(msg, file=sys.stderr))
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


if __name__ == "__main__":
    main()
