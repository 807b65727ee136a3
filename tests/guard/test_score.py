"""Judges, consensus, selection/injection, concurrency and the cache, against a loopback
OpenAI-compatible server started by the tests (no network).  python -m pytest -q tests/test_score.py"""
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from world import rule_judge
import score
from guard import judge as judge_guard
from lab import score_cli

# 12 records of the authors' released VQA-RAD preference file (aiming-lab/MMedPO, data/)
FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "official_mmedpo_vqa-rad_sample.json")


# -----------------------------------------------------------------------------
# a scripted OpenAI-compatible server on 127.0.0.1

class Loopback:
    """A threaded HTTP server on 127.0.0.1 (a free port) for a handler class; its `url` ends in /v1."""

    def serve(self, handler_class):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Server(Loopback):
    """Replies from `script` (a list of (status, content, headers, delay) consumed in order, the last
    one repeated), or from `reply(body)`. Records every request's body and headers."""

    def __init__(self, script=None, reply=None, delay=0.0):
        self.script, self.reply, self.delay = list(script or []), reply, delay
        self.requests, self.lock = [], threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                    step = outer.script.pop(0) if len(outer.script) > 1 else (outer.script[0] if outer.script else None)
                if step is None:
                    step = (200, outer.reply(body), {}, outer.delay)
                status, content, headers, delay = step
                time.sleep(delay)
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}) \
                    if status == 200 else content
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(payload.encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

        self.serve(Handler)


@pytest.fixture
def server_factory():
    servers = []

    def make(**kw):
        servers.append(Server(**kw))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def judge(server, max_retries=3, **kw):
    kw = {"timeout": 2.0, "retry": judge_guard.Retry(max_retries, 0.01), **kw}
    return judge_guard.HTTPJudge("med", server.url, "med-llm", **kw)


# -----------------------------------------------------------------------------
# the consensus rule on scripted judges

class Scripted:
    def __init__(self, name, replies):
        self.name, self.model, self.replies, self.seen = name, "scripted", list(replies), []

    def __call__(self, messages):
        self.seen.append(messages[-1]["content"])
        return self.replies.pop(0)


def run(judges, rounds=5):
    return score.consensus(judges, "Is there a nodule?", "Yes", "No", rounds)


def test_immediate_agreement():
    a, b, c = (Scripted(n, r) for n, r in [("a", ['{"agree": false, "score": 7}']),
                                            ("b", ['{"agree": true, "score": 7}']),
                                            ("c", ['{"agree": true}'])])
    r = run([a, b, c])
    assert r["score"] == 7.0 and r["consensus"] and len(r["history"]) == 3
    assert [h["judge"] for h in r["history"]] == ["a", "b", "c"]
    assert "Previous score: 7" in b.seen[0] and "Previous score" not in a.seen[0]


def test_disagreement_then_agreement():
    a = Scripted("a", ['{"score": 7}', '{"agree": true, "score": 5}'])
    b = Scripted("b", ['{"agree": false, "score": 5}'])
    r = run([a, b])
    # S = [7, 5, 5]: the last g = 2 agree on 5, and the score is the mean of all of S (paper Sec. 3.2.1)
    assert r["score"] == pytest.approx(17 / 3) and round(r["score"], 2) == 5.67 and r["consensus"]
    assert [h["score"] for h in r["history"]] == [7, 5, 5]
    assert [h["agreed"] for h in r["history"]] == [False, False, True]


def test_never_agreeing_gives_the_mean_after_5_rounds():
    a = Scripted("a", ['{"score": 2}'] * 5)
    b = Scripted("b", ['{"score": 8}'] * 5)
    r = run([a, b])
    assert not r["consensus"] and len(r["history"]) == 10
    assert r["score"] == 5.0


def test_abstentions_are_recorded_not_counted():
    # b's two replies are unreadable (first and the corrective retry): it abstains
    a = Scripted("a", ['{"score": 6}'])
    b = Scripted("b", ["I cannot say", "still cannot say"])
    c = Scripted("c", ['{"agree": true, "score": 6}'])
    r = run([a, b, c])
    assert [h["abstained"] for h in r["history"]] == [False, True, False]
    assert r["score"] == 6.0 and r["consensus"]
    assert "could not be read" in b.seen[1]
    everyone_abstains = run([Scripted("x", ["??"] * 10)], rounds=5)
    assert everyone_abstains["score"] is None and len(everyone_abstains["history"]) == 5


def test_single_judge_and_out_of_range_retry():
    r = run([Scripted("a", ['{"score": 15}', "the score is 4"])])
    assert r["score"] == 4.0 and r["consensus"] and len(r["history"]) == 1


@pytest.mark.parametrize("text, previous, expected", [
    ('{"agree": false, "score": 3}', None, (3, False)),
    ('Sure! {"agree": true, "score": 6} done', 6, (6, True)),
    ('{"agree": true}', 4, (4, True)),
    ('{"score": "9"}', None, (9, False)),
    ('{"score": 11}', None, (None, False)),
    ("I would give it a 7 out of 10.", None, (7, False)),
    ("Score: 42", None, (None, False)),
    ("I agree with the previous judge.", 5, (5, True)),
    ("I disagree.", 5, (None, False)),
    ("", None, (None, False)),
    ("I would rate this an 8", None, (8, False)),
    ("Score (0-10): 9", None, (9, False)),                # the scale's 0 is not the score
    ("8/10", None, (8, False)),
    ("On a scale of 0 to 10: 3", None, (3, False)),
    ("I disagree with 5; my score is 8", 5, (None, False)),   # two scores: ambiguous, a failed reply
    ('{"score": 3} and on reflection {"score": 9}', None, (None, False)),   # two JSON answers: failed
    ('{"score": 3, "score": 9}', None, (None, False)),      # a key given twice: failed, not the last value
    ('{"agree": true, "agree": false}', 4, (None, False)),
])
def test_parse_score(text, previous, expected):
    assert score.parse_score(text, previous) == expected


# -----------------------------------------------------------------------------
# the HTTP judge against the loopback server

def test_http_request_body_and_headers(server_factory, monkeypatch):
    monkeypatch.setenv("MMEDPO_TEST_KEY", "sk-test-secret-123")
    srv = server_factory(reply=lambda body: '{"agree": false, "score": 8}')
    j = judge(srv, key_env="MMEDPO_TEST_KEY")
    r = score.consensus([j], "Where is the nodule?", "right upper zone", "left upper zone")
    assert r["score"] == 8.0
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test-secret-123"
    assert req["body"]["model"] == "med-llm" and req["body"]["temperature"] == 0
    assert req["body"]["max_tokens"] > 0
    roles = [m["role"] for m in req["body"]["messages"]]
    assert roles == ["system", "user"] and "left upper zone" in req["body"]["messages"][1]["content"]


def test_http_free_text_reply(server_factory):
    srv = server_factory(reply=lambda body: "I'd rate this a 6.")
    assert score.consensus([judge(srv)], "q?", "yes", "no")["score"] == 6.0


def test_http_retries_500_and_429_then_succeeds(server_factory):
    srv = server_factory(script=[(500, "boom", {}, 0), (429, "slow down", {"Retry-After": "0"}, 0),
                                 (200, '{"score": 5}', {}, 0)])
    assert judge(srv)([{"role": "user", "content": "x"}]) == '{"score": 5}'
    assert len(srv.requests) == 3


def test_http_gives_up_after_a_bounded_number_of_retries(server_factory):
    srv = server_factory(script=[(503, "down", {}, 0)])
    with pytest.raises(score.JudgeError, match="gave up after 3 attempts: HTTP 503"):
        judge(srv, max_retries=2)([{"role": "user", "content": "x"}])
    assert len(srv.requests) == 3


def test_http_timeout_is_retried(server_factory):
    srv = server_factory(script=[(200, '{"score": 1}', {}, 1.0), (200, '{"score": 3}', {}, 0)])
    assert judge(srv, timeout=0.3)([{"role": "user", "content": "x"}]) == '{"score": 3}'


def test_http_garbage_reply_abstains(server_factory):
    srv = server_factory(reply=lambda body: "blah blah")
    r = score.consensus([judge(srv)], "q?", "yes", "no", rounds=2)
    assert r["score"] is None and all(h["abstained"] for h in r["history"])
    assert len(srv.requests) == 4  # 2 rounds x (ask + one corrective retry)


def test_an_unreachable_server_stops_the_work_early_naming_it(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    j = judge_guard.HTTPJudge("dead", f"http://127.0.0.1:{port}/v1", "m", retry=judge_guard.Retry(1, 0.01), timeout=1)
    pairs = [{"prompt": f"q{i}?", "chosen": "yes", "rejected": "no"} for i in range(20)]
    calls = []
    real = judge_guard.HTTPJudge.__call__
    monkey = lambda self, messages: (calls.append(1), real(self, messages))[1]
    judge_guard.HTTPJudge.__call__ = monkey
    try:
        with pytest.raises(judge_guard.JudgeUnreachable, match=f"cannot connect to http://127.0.0.1:{port}"):
            score.score_pairs(pairs, [j], str(tmp_path / "cache.jsonl"), workers=2, log=lambda m: None)
    finally:
        judge_guard.HTTPJudge.__call__ = real
    assert len(calls) <= 4          # the first items of each worker, not all 20 pairs times the retries
    assert not (tmp_path / "cache.jsonl").read_text()  # failures are not cached: the next run asks again


def test_api_key_never_written(server_factory, tmp_path, monkeypatch, capsys):
    secret = "sk-never-write-me-987"
    monkeypatch.setenv("MMEDPO_TEST_KEY", secret)
    srv = server_factory(script=[(401, f"bad key {secret}", {}, 0)])
    pairs_path, out_path = tmp_path / "pairs.jsonl", tmp_path / "scores.jsonl"
    pairs_path.write_text(json.dumps({"prompt": "q?", "chosen": "yes", "rejected": "no", "source": "text"}) + "\n")
    with pytest.raises(SystemExit) as e:    # a refused key stops scoring at once, with a clear message ...
        score_cli.main(["--pairs", str(pairs_path), "--out", str(out_path),
                    "--judge", f"med={srv.url},model=m,key_env=MMEDPO_TEST_KEY"])
    captured = capsys.readouterr()
    written = "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    assert srv.requests[0]["headers"]["Authorization"] == f"Bearer {secret}"
    assert "authentication failed, HTTP 401" in str(e.value) and "MMEDPO_TEST_KEY" in str(e.value)
    assert secret not in written + captured.out + captured.err + str(e.value)  # ... that holds no key


# -----------------------------------------------------------------------------
# many pairs: concurrency and the cache

def pairs(n):
    return [{"prompt": f"<image>\nIs there a nodule in case {i}?", "chosen": "Yes", "rejected": "No"}
            for i in range(n)]


def test_eight_workers_are_at_least_5x_faster_than_one(server_factory):
    srv = server_factory(reply=lambda body: '{"score": 7}', delay=0.05)
    j = judge(srv)
    t0 = time.perf_counter()
    score.score_pairs(pairs(64), [j], None, workers=1, log=lambda s: None)
    sequential = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = score.score_pairs(pairs(64), [j], None, workers=8, log=lambda s: None)
    concurrent = time.perf_counter() - t0
    assert all(r["score"] == 7.0 for r in out) and len(srv.requests) == 128
    assert sequential / concurrent >= 5, (sequential, concurrent)


def test_judge_order_is_kept_within_a_pair_under_concurrency(server_factory):
    srv_a = server_factory(reply=lambda body: '{"score": 6}', delay=0.01)
    srv_b = server_factory(reply=lambda body: '{"agree": true, "score": 6}')
    out = score.score_pairs(pairs(16), [judge(srv_a), judge_guard.HTTPJudge("b", srv_b.url, "m2", retry=judge_guard.Retry(backoff=0.01))],
                            None, workers=8, log=lambda s: None)
    assert all([h["judge"] for h in r["history"]] == ["med", "b"] for r in out)


def test_second_run_makes_zero_requests(server_factory, tmp_path):
    srv = server_factory(reply=lambda body: '{"score": 7}')
    cache = str(tmp_path / "cache.jsonl")
    first = score.score_pairs(pairs(10), [judge(srv)], cache, workers=4, log=lambda s: None)
    n = len(srv.requests)
    second = score.score_pairs(pairs(10), [judge(srv)], cache, workers=4, log=lambda s: None)
    assert n == 10 and len(srv.requests) == n
    assert [r["score"] for r in first] == [r["score"] for r in second]


def test_torn_last_line_resumes(server_factory, tmp_path):
    srv = server_factory(reply=lambda body: '{"score": 7}')
    cache = tmp_path / "cache.jsonl"
    score.score_pairs(pairs(5), [judge(srv)], str(cache), log=lambda s: None)
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text("".join(lines[:4]) + lines[4][:25])  # a crash in the middle of the 5th record
    score.score_pairs(pairs(5), [judge(srv)], str(cache), log=lambda s: None)
    assert len(srv.requests) == 6  # only the torn pair was asked again
    assert [json.loads(l)["status"] for l in cache.read_text().splitlines()] == ["scored"] * 5


# -----------------------------------------------------------------------------
# the rule judge, selection, injection, leaks

def fixture_records():
    with open(FIXTURE) as f:
        return json.load(f)


BAD_ANSWERS = ["", "asdkj qwrtp zxcvbnm", "The weather is sunny and the market closes at five."]


def test_rule_judge_prefers_believable_errors_on_the_released_records():
    records = [r for r in fixture_records() if rule_judge.clean_answer(r["conversations"][1]["value"])]
    assert len(records) == 11
    for r in records:
        q = r["conversations"][0]["value"].replace("<image>", "").strip()
        truth, rejected = r["conversations"][1]["value"], r["rejected_conversations"][1]["value"]
        good = rule_judge.rule_score(q, truth, rejected)
        bad = [rule_judge.rule_score(q, truth, b) for b in BAD_ANSWERS + [truth, q]]
        assert good >= 7 and max(bad) <= 1, (r["id"], good, bad)


@pytest.mark.parametrize("question, truth, plausible, implausible", [
    ("Where is the nodule?", "Right upper zone", "Left upper zone", "The kidney shows hydronephrosis."),
    ("Is there a pleural effusion?", "No", "Yes, there is a small left pleural effusion.", "Is there a pleural effusion?"),
    ("What abnormality is seen?", "A mass in the left lower zone", "A nodule in the left lower zone", "A mass in the left lower zone"),
    ("Is the heart enlarged?", "Yes", "No, the heart size is normal.", "Yes, the heart is enlarged."),
    ("What modality is used?", "CT", "MRI", "xkcdqz vvbnm"),
    ("Which side is the pneumothorax on?", "left", "right", "The spleen and the liver are fine."),
])
def test_rule_judge_hand_cases(question, truth, plausible, implausible):
    assert rule_judge.rule_score(question, truth, plausible) >= 7
    assert rule_judge.rule_score(question, truth, implausible) <= 2


def test_rule_judge_speaks_the_prompt_protocol():
    r = score.consensus([rule_judge.RuleJudge("r1"), rule_judge.RuleJudge("r2")], "Where is the mass?",
                        "right lower zone", "left lower zone")
    assert r["consensus"] and r["score"] >= 7 and [h["agreed"] for h in r["history"]] == [False, True]
    rule = rule_judge.RuleJudge()
    assert score.select_dispreferred(rule, "Where is the mass?", "right lower zone",
                                     ["right lower zone", "left lower zone", "asdf"]) == 1
    assert score.select_dispreferred(rule, "Is the heart enlarged?", "Yes", ["Yes", "yes, it is"]) is None


@pytest.mark.parametrize("question, truth", [
    ("Where is the nodule?", "There is a small nodule in the right upper zone."),
    ("Is there a pleural effusion?", "No"),
    ("What abnormality is seen?", "Pleural effusion"),
    ("What radiographic sign is seen in the intestines", "air fluid level"),
    ("In which lobe are the lesions?", "Bilateral frontal lobes"),
    ("Is the heart size normal?", "The heart size is normal. No effusion."),
])
def test_injection_is_wrong_on_topic_and_deterministic(question, truth):
    for seed in range(4):
        fake = rule_judge.inject_hallucination(question, truth, seed)
        assert rule_judge.words(fake) != rule_judge.words(truth)
        assert fake == rule_judge.inject_hallucination(question, truth, seed)
        assert rule_judge.rule_score(question, truth, fake) >= 5, fake  # on topic: not off-topic/wrong organ


def test_write_hallucination_falls_back_on_a_leaked_or_identical_reply():
    leaky = Scripted("gpt", ["Original Answer: right\nCandidate Answer1: left"])
    text, how = score.write_hallucination(leaky, "Which side?", "right")
    assert text == "left" and how.startswith("rule-injector")
    same = Scripted("gpt", ["Right."])
    assert score.write_hallucination(same, "Which side?", "right")[0] == "left"
    good = Scripted("gpt", ["Hallucinated answer: The lesion is on the left."])
    assert score.write_hallucination(good, "Which side?", "right") == ("The lesion is on the left.", "injected by gpt")


def test_leaked_scaffolding_in_the_released_data_is_caught():
    leaked = [r["id"] for r in fixture_records()
              if rule_judge.clean_answer(r["conversations"][1]["value"]) is None
              or rule_judge.clean_answer(r["rejected_conversations"][1]["value"]) is None]
    assert leaked == [1055]
    assert rule_judge.clean_answer("Answer: left lower zone") == "left lower zone"


def test_an_echoed_key_is_scrubbed_even_where_the_error_text_is_cut(monkeypatch):
    key = "sk-" + "k" * 31                                            # 34 characters
    monkeypatch.setenv("TEST_JUDGE_KEY", key)

    class Reply:
        status_code, headers = 400, {}
        text = "x" * 170 + "Authorization: Bearer " + key            # the key starts at 192: it straddles the cut at 200
    monkeypatch.setattr(judge_guard.HTTPJudge, "_post", lambda self, body, headers: (Reply.status_code, Reply.headers, Reply.text))
    judge = judge_guard.HTTPJudge("j", "http://127.0.0.1:9/v1", "m", key_env="TEST_JUDGE_KEY", retry=judge_guard.Retry(0))
    with pytest.raises(score.JudgeError) as e:
        judge([{"role": "user", "content": "hi"}])
    assert "sk-k" not in str(e.value) and "Bearer *" in str(e.value)   # cut first, 8 of its characters would stay


# -----------------------------------------------------------------------------
# replies that must be bounded: a trickle, a flood, a redirect to another host, an echo of most of the key

class RawServer(Loopback):
    """A loopback server whose handler(self) writes whatever it likes; counts the requests it gets."""

    def __init__(self, handler):
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                outer.hits += 1
                self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    handler(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass
        self.serve(Handler)


def head(h, status=200, extra=()):
    h.send_response(status)
    for k, v in extra:
        h.send_header(k, v)
    h.end_headers()


def test_a_trickling_reply_is_cut_at_the_timeout_in_total():
    def trickle(h):
        head(h)
        for _ in range(100):   # one byte every 0.1 s: each read is quick, the whole would take 10 s
            h.wfile.write(b" ")
            h.wfile.flush()
            time.sleep(0.1)
    server = RawServer(trickle)
    t0 = time.time()
    with pytest.raises(score.JudgeError, match="within"):
        judge_guard.HTTPJudge("med", server.url, "m", timeout=0.5, retry=judge_guard.Retry(1, 0.01))([{"role": "user", "content": "q"}])
    server.close()
    assert time.time() - t0 < 4 and server.hits == 2


def test_headers_trickled_a_byte_at_a_time_are_cut_at_the_timeout_too():
    """The deadline covers the headers' phase: a server that sends its status line one byte every 0.1 s holds a
    call no longer than the timeout (requests' own timeout restarts at every byte)."""
    def trickle_head(h):
        for b in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" * 4:
            h.wfile.write(bytes([b]))
            h.wfile.flush()
            time.sleep(0.1)
    server = RawServer(trickle_head)
    t0 = time.time()
    with pytest.raises(score.JudgeError, match="within"):
        judge_guard.HTTPJudge("med", server.url, "m", timeout=0.5, retry=judge_guard.Retry(0))([{"role": "user", "content": "q"}])
    server.close()
    assert time.time() - t0 < 2


def test_a_broken_chunked_reply_is_a_judge_error_not_a_crash():
    """A chunk size that is not hex (urllib3's own exception while the body is read) is a failed reply."""
    def bad_chunks(h):
        head(h, extra=[("Transfer-Encoding", "chunked")])
        h.wfile.write(b"zz\r\nhello\r\n0\r\n\r\n")
    server = RawServer(bad_chunks)
    with pytest.raises(score.JudgeError, match="gave up"):
        judge_guard.HTTPJudge("med", server.url, "m", timeout=2, retry=judge_guard.Retry(1, 0.01))([{"role": "user", "content": "q"}])
    server.close()


def test_stopping_gives_up_the_request_in_flight_and_its_retries_at_once():
    """Ctrl-C sets STOPPING: a call waiting on a slow server returns within a fraction of a second, and asks
    no more (the process exits without waiting for the retries)."""
    def slow(h):
        time.sleep(3)
    server = RawServer(slow)
    j = judge_guard.HTTPJudge("med", server.url, "m", timeout=10, retry=judge_guard.Retry(5, 1.0))
    threading.Timer(0.3, judge_guard.STOPPING.set).start()
    t0 = time.time()
    try:
        with pytest.raises(score.JudgeError, match="interrupted"):
            j([{"role": "user", "content": "q"}])
    finally:
        judge_guard.STOPPING.clear()
    assert time.time() - t0 < 1.5 and server.hits == 1
    server.close()


def test_a_flood_is_refused_unread():
    def flood(h):
        head(h)
        for _ in range(64):
            h.wfile.write(b"x" * (64 << 10))    # 4 MB
    server = RawServer(flood)
    with pytest.raises(score.JudgeError, match="larger than"):
        judge_guard.HTTPJudge("med", server.url, "m", timeout=5, retry=judge_guard.Retry(0))([{"role": "user", "content": "q"}])
    server.close()


def test_a_redirect_is_never_followed(server_factory):
    elsewhere = server_factory(reply=lambda body: "7")
    hop = RawServer(lambda h: head(h, 307, [("Location", elsewhere.url + "/chat/completions")]))
    with pytest.raises(score.JudgeError, match="redirect"):
        judge_guard.HTTPJudge("med", hop.url, "m", timeout=2, retry=judge_guard.Retry(1, 0.01))([{"role": "user", "content": "truth"}])
    hop.close()
    assert elsewhere.requests == []          # the prompt, with the ground truth, never reached the other host


def test_a_reply_with_most_of_the_key_is_refused_and_scrubbed(server_factory, monkeypatch):
    key = "sk-" + "0123456789abcdefghijklmnopqrstuvwxyzAB"[:37]
    monkeypatch.setenv("JUDGE_KEY", key)
    server = server_factory(reply=lambda body: f"score 7, your key is {key[:-2]}")
    j = judge(server, key_env="JUDGE_KEY", max_retries=1)
    with pytest.raises(score.JudgeError) as e:
        j([{"role": "user", "content": "q"}])
    assert "holds (part of) the API key" in str(e.value) and key[:16] not in str(e.value)
    assert key[5:21] not in j._scrub(f"error text {key[:-2]}")


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate", "bomb"])
def test_a_compressed_reply_is_decoded_within_the_size_bound(encoding):
    """A server that compresses anyway (the judge asks for identity) is read: gzip, zlib-wrapped and raw
    deflate; a small body that inflates past the reply bound is an oversized reply, never inflated."""
    import zlib
    content = '{"agree": false, "score": 6}' if encoding != "bomb" else "x" * (judge_guard.MAX_REPLY_BYTES + 10)
    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
    wbits = {"gzip": 31, "deflate": 15, "raw-deflate": -15, "bomb": 31}[encoding]
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    body = c.compress(payload) + c.flush()
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            seen.append(self.headers.get("Accept-Encoding"))
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip" if wbits == 31 else "deflate")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    server = Loopback()
    server.serve(Handler)
    try:
        j = judge(server, max_retries=0)
        if encoding == "bomb":
            assert len(body) < judge_guard.MAX_REPLY_BYTES // 100
            with pytest.raises(judge_guard.JudgeError, match="larger than"):
                j([{"role": "user", "content": "score"}])
        else:
            assert score.parse_score(j([{"role": "user", "content": "score"}])) == (6, False)
        assert seen[0] == "identity"
    finally:
        server.close()
