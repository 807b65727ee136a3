"""The instrument's two checking rows, as preference records for plain supervision (`--objective oracle`,
`--objective lean`): what a grounding score must move for, and must not. lab/instrument.py runs them on
every base and seed; docs/instrument.md says what they showed.

Tests:  python -m pytest -q tests/world/test_benchmark.py
"""
import random


def build_oracle_records(model, processor, cfg, pool, store, pairs_dir, device, log=print, answer=None):
    """The instrument's oracle: supervision with the TRUE answers on the preference split, for every kind the
    probes ask about: its presence questions and its side questions (on real data its closed yes/no ones),
    each as many "yes" as "no", and as many reports (drawn with the run's seed). A grounding score that this
    row cannot raise cannot show what a method does. With `answer` ("yes": the lean) every closed question
    gets that answer and every report is another image's (a shuffle: the reports' words without their
    image), a row that must NOT raise it. The other answer is kept as `rejected` for the layout, never
    trained on. returns (records, complete)."""
    yes_no = lambda it: str(it["answer"]).strip().lower()
    rng, name = random.Random(cfg.seed), "lean" if answer else "oracle"
    closed = [[it for it in pool if it.get("qtype") == q] for q in ("presence", "side")]
    closed = [c for c in closed if c] or [[it for it in pool if it["type"] == "closed" and yes_no(it) in ("yes", "no")]]
    items, counts = [], []
    for group in filter(None, closed):
        by_answer = {a: [it for it in group if yes_no(it) == a] for a in ("yes", "no")}
        n = min(len(v) for v in by_answer.values())
        items += rng.sample(by_answer["yes"], n) + rng.sample(by_answer["no"], n)
        counts.append(f"{2 * n} {group[0].get('qtype', 'closed')}")
    reports = sorted(rng.sample([it for it in pool if it["type"] == "report"],
                                min(sum(it["type"] == "report" for it in pool), len(items) // max(1, len(counts)))),
                     key=lambda it: it["id"])
    other = {it["id"]: reports[(i + 1) % len(reports)]["answer"] for i, it in enumerate(reports)}  # the next image's
    records = []
    for it in sorted(items + reports, key=lambda it: it["id"]):
        if it["type"] == "report":
            true, wrong = it["answer"], other[it["id"]]
        else:
            true, wrong = it["answer"], "no" if yes_no(it) == "yes" else "yes"
        chosen = (answer if it["type"] != "report" else wrong) if answer else true
        records.append({"id": f"{name}-{it['id']}", "source": name, "image": store.path(it["image_id"]), "rejected_image": None,
                        "prompt": it["question"], "chosen": chosen, "rejected": true if chosen != true else wrong,
                        "score": None, "weight": None, "qtype": it.get("qtype") or it["type"], "provenance": f"{answer!r} to every question and another image's "
                        f"report (a lean)" if answer else "the true answer (an oracle)"})
    log(f"{name}: {', '.join(counts)} questions (half truly yes) and {len(reports)} reports of {len(pool)} items, answered "
        + (f"{answer!r} whatever the image, each report another image's" if answer else "with the truth"))
    return records, True
