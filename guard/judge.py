"""The judges' hardening: errors, many items at once through a thread pool and a JSONL cache, and a judge
behind an OpenAI-compatible server, bounded in time, size and host, whose API key is never written.

score.py holds the paper's scoring (prompts, parsing, the chained consensus); this file holds what makes
it survive real servers: a bad reply costs one pair, a refused key stops at once, finished scores are
never asked again.

stdlib (requests inside the HTTP judge). Tests:  python -m pytest -q tests/guard
"""
import argparse
import concurrent.futures
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


class JudgeError(RuntimeError):
    """A judge could not give a usable reply after all retries (the pair is recorded as failed)."""


class JudgeAuthError(JudgeError):
    """The server refused the key (HTTP 401/403): no pair can succeed, so the work stops at once."""


class JudgeUnreachable(JudgeError):
    """No connection could be made to the server on any attempt."""


STOPPING = threading.Event()   # set by Ctrl-C in run_cached: requests in flight and their retries give up at once


def run_cached(keys, work, cache_path=None, workers=4, log=print, what="scored"):
    """Run work(i) -> {status, ...} for every i whose key is not in the JSONL cache, `workers` at a time.
    Every finished result (status other than 'failed') is appended to the cache at once and never
    asked again. A failure of one item (a bad reply, anything unexpected) costs only that item: it is
    recorded as failed with its reason, and asked again on the next run. The work stops at once when no
    item can succeed: a refused key (JudgeAuthError), or a server that could not be reached by any of
    the first `workers` items before one succeeded (JudgeUnreachable). Items not yet asked are then
    recorded as failed, every finished result stays in the cache, and the error is raised at the end.
    returns the results in order."""
    STOPPING.clear()   # a new piece of work (an earlier Ctrl-C in this process was handled)
    cache = load_cache(cache_path) if cache_path else {}   # a skipped line is a warning: standard error
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
        last = t0  # the first line after 2 s: an ETA from the first burst would say nothing
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
    except KeyboardInterrupt:   # stop now: no wait for the requests in flight, nor for their retries
        STOPPING.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=not STOPPING.is_set())
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
        except (ValueError, RecursionError):
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


Retry = namedtuple("Retry", "max_retries backoff max_backoff", defaults=(4, 1.0, 30.0))  # seconds, doubled each try


MAX_REPLY_BYTES = 1 << 20  # a chat completion of a few tokens is a few kB; a larger reply is refused, not read


def parse_http_judge(spec, flag="--judge"):
    """'NAME=URL,model=M[,key_env=VAR][,timeout=S][,max_tokens=N]' -> HTTPJudge; anything else raises
    argparse.ArgumentTypeError naming `flag`."""
    def bad(msg):  # the spec as given may hold a key (in the URL, or pasted as key_env): it is never echoed
        return argparse.ArgumentTypeError(f"{flag} {redact_spec(spec)!r}: {msg}")
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
        raise bad("the URL is not an http(s) URL with a host and a valid port")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise bad("the URL holds credentials, a query or a fragment; give the server's base URL only and the key "
                  "through an environment variable named by key_env=VAR (a key in a URL would be written wherever "
                  "the spec is stored)")
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
        raise bad("key_env= must name an environment variable (what was given is not a name, and is not printed: "
                  "if it is the key itself, put it in a variable and name that)")
    return HTTPJudge(name, url, kw["model"], kw.get("key_env"), max_tokens, timeout)


def redact_spec(spec):
    """A judge spec safe to print or store: a URL's user:password and query values, and a key_env value
    that is not a variable name (a pasted key), replaced by ***."""
    name, _, rest = str(spec).partition("=")
    url, *opts = rest.split(",")
    url = re.sub(r"(?<=://)[^/@]*@", "***@", url)
    url = re.sub(r"([?&#][^=&#]*=)[^&#]*", r"\1***", url)
    opts = [o if not o.startswith("key_env=") or re.fullmatch(r"key_env=[A-Za-z_][A-Za-z0-9_]*", o) else "key_env=***"
            for o in opts]
    return ",".join([f"{name}={url}" if rest else name] + opts)


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
        """(status, headers, text) of one POST, bounded in total time: `timeout` from the first byte sent to
        the last read, the headers' phase included (the exchange runs in a daemon thread that is given up
        at the deadline, or at once when STOPPING is set), and in size (MAX_REPLY_BYTES); a redirect is
        never followed (the prompt holds the ground truth, and another host must not get it). Raises
        requests exceptions (a fault urllib3 raises while the body is read becomes one)."""
        import requests
        import urllib3
        box, done, deadline = {}, threading.Event(), time.monotonic() + self.timeout

        def exchange():
            try:
                box["reply"] = self._exchange(body, headers, deadline)
            except urllib3.exceptions.HTTPError as e:   # a bad chunk size, a stall inside the body
                box["error"] = requests.RequestException(f"{type(e).__name__}: {e}")
            except BaseException as e:
                box["error"] = e
            finally:
                done.set()
        threading.Thread(target=exchange, daemon=True).start()
        while not done.wait(0.05):
            if STOPPING.is_set():
                raise requests.RequestException("interrupted")
            if time.monotonic() > deadline:
                raise requests.Timeout(f"no complete reply within {self.timeout}s")
        if "error" in box:
            raise box["error"]
        return box["reply"]

    def _exchange(self, body, headers, deadline):
        import requests
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
            raw = decoded(b"".join(chunks), r.headers.get("Content-Encoding", ""))
            try:
                return r.status_code, r.headers, raw.decode(r.encoding or "utf-8", errors="replace")
            except LookupError:                          # a charset Python does not know
                return r.status_code, r.headers, raw.decode("utf-8", errors="replace")

    def __call__(self, messages):
        """The reply's text. A reply that is not a string, or that holds the API key (a server echoing
        the request), is unusable: asked again, then JudgeError. Errors never carry the key."""
        import requests
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}   # a server may still compress
        if self.key_env:
            if not self._key():
                raise JudgeError(f"{self.name}: environment variable {self.key_env} is not set")
            headers["Authorization"] = f"Bearer {self._key()}"
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        reason, connected = "", False
        for attempt in range(self.max_retries + 1):
            if STOPPING.is_set():
                raise JudgeError(f"{self.name}: interrupted")
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
                    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
                        content = None
                    if content is None or not isinstance(content, str):  # half-written, or JSON NaN
                        reason = f"malformed reply from {self.url}: {text!r}"
                    elif any(piece in content for piece in self._key_pieces()):
                        reason = f"the reply from {self.url} holds (part of) the API key: not used"
                    else:
                        return content
                    if attempt < self.max_retries:
                        STOPPING.wait(wait)
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
                STOPPING.wait(wait)
        error = JudgeError if connected else JudgeUnreachable
        raise error(f"{self.name}: gave up after {attempt + 1} attempts: {reason}")


def decoded(body, encoding):
    """A reply's bytes with its Content-Encoding (gzip, deflate, either raw or zlib-wrapped) undone, never
    inflated beyond MAX_REPLY_BYTES (a compression bomb is an oversized reply)."""
    import zlib
    import requests
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise requests.RequestException(f"reply in an unknown Content-Encoding {encoding!r}")
    for wbits in ((31,) if "gzip" in encoding else (15, -15)):     # deflate: zlib-wrapped, or raw as some send it
        try:
            d = zlib.decompressobj(wbits)
            out = d.decompress(body, MAX_REPLY_BYTES + 1)
        except zlib.error:
            continue
        if len(out) > MAX_REPLY_BYTES or d.unconsumed_tail:
            raise requests.RequestException(f"reply larger than {MAX_REPLY_BYTES} bytes once decompressed")
        return out
    raise requests.RequestException(f"reply not valid {encoding} data")
