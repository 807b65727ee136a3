"""How a run survives: one atomic writer, content keys, one `cached` helper for every stage's output,
training checkpoints, a lock against a second writer, and loading a saved model folder.

Every file a run writes goes through `atomic_write` (a temporary file in the same folder, then a
rename), so a kill leaves either the old file or the new one, never a torn one; a full disk is said
as such, with the file named, and the old file is kept. A stage's output is reused only when a key
file written *after* it holds the same key, and the key is built from the content the output depends
on (`fingerprint`, `file_digest`), never from a path that can be rewritten.

The file reads downward: the stage cache and its content keys, the training checkpoints, then the
files every part writes and reads.

    python -m pytest -q tests/test_reliability.py tests/test_faults.py

torch, numpy, PIL + stdlib (transformers inside `load_model`).
"""
import errno
import hashlib
import json
import os
import stat
import sys
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


# -----------------------------------------------------------------------------
# content keys and the stage cache

def cached(key_path, key, compute, save, load, log, what, writer=True, output=None):
    """Reuse a stage's output or compute it. `load()` is used when `key_path` holds `key` (the key is
    written after the output, so a kill in between means 'not done') and, when the output is a file
    (`output`), the digest of its bytes as they were saved: an output edited after its key was written is
    computed again, never reused. Else `value, complete = compute()`, `save(value)`, and the key is
    written only if complete. The old key is removed before computing: an old key must never vouch for a
    changed output. With several processes every one computes (its share) and only the `writer` saves and
    writes keys. returns the value."""
    stored = read_json(key_path, log)
    if stored is not None and stored.get("key") == key:
        if output is not None and stored.get("output") != file_digest(output):
            log(f"{what}: {output} is not the file its key vouches for (changed or missing); computing it again")
        else:
            value = load()
            if value is not None:
                log(f"{what}: reused ({key_path})")
                return value
    if writer and os.path.exists(key_path):
        os.remove(key_path)
    value, complete = compute()
    if writer:
        save(value)
        if complete:
            write_json(key_path, {"key": key, **({"output": file_digest(output)} if output is not None else {})})
        else:
            log(f"      {what} is incomplete: it will be computed again on the next run")
    return value


def fingerprint(obj):
    """A short hash of any JSON-able value: the key under which a stage's output is stored."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def weights_stamp(folder):
    """The names and byte digests of a model folder's weight files: another model's weights with the same
    names, sizes and times get another stamp. Each file is hashed once per process while it is unchanged
    (`file_digest`; a 7B model's 14 GB take seconds, once)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin")))
    return [(f, file_digest(os.path.join(folder, f))) for f in files]


ADAPTER_BASE = "base_weights.json"   # beside an adapter: the stamp of the base it was trained on


def write_adapter_base(adapter_dir, base_path):
    """Record in the adapter's folder which base (by its weights' digests) it was trained on."""
    write_json(os.path.join(adapter_dir, ADAPTER_BASE), {"base": os.path.abspath(base_path),
                                                         "weights": weights_stamp(base_path)}, indent=1)


def adapter_base_mismatch(adapter_dir, base_path):
    """Why an adapter may not go on this base (its record names other weights), or None (the same weights,
    or an adapter from elsewhere that records none)."""
    record = read_json(os.path.join(adapter_dir, ADAPTER_BASE), log=lambda *a: None)
    if not isinstance(record, dict) or "weights" not in record:
        return None
    if [list(w) for w in record["weights"]] != [list(w) for w in weights_stamp(base_path)]:
        return (f"it was trained on another base ({record.get('base')}, other weights than {base_path}'s); "
                f"evaluate it on that base")
    return None


_DIGESTS = {}  # (path, size, mtime_ns) -> digest: each file is read once per process while it is unchanged


def file_digest(path):
    """A hash of the file's bytes (None for a missing file): two files with equal bytes get equal
    digests wherever they lie, and a file rewritten in place gets a new one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    stamp = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if stamp not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[stamp] = h.hexdigest()[:24]
    return _DIGESTS[stamp]


# -----------------------------------------------------------------------------
# training checkpoints, seeds and the schedule (same command, same result), the run's lock, a model folder

def save_checkpoint(path, lora_state, optimizer, step, history, rng_states, config, inputs):
    """Adapter weights, optimizer, step, history, every process's RNG, the config and a fingerprint of
    the inputs (records with their weights, the model, the encoding): tensors and plain values only."""
    save_tensors({"lora": {k: v.cpu() for k, v in lora_state.items()}, "optimizer": optimizer.state_dict(),
                  "step": step, "history": history, "rng": rng_states, "config": config, "inputs": inputs}, path)


def seed_everything(seed):
    """Each stage that draws random numbers starts from the run's seed, so that whether an earlier stage
    was computed or reused from disk changes nothing after it."""
    import random
    import numpy as np
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(rng):
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


class RunLock:
    """An exclusive lock on a run folder for as long as the run lives: a second run into the same
    folder is refused at once instead of racing on its files. The OS releases it when the process dies."""

    def __init__(self, folder):
        import fcntl
        os.makedirs(folder, exist_ok=True)
        self.path, self.file = os.path.join(folder, RUN_LOCK), None
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise RuntimeError(f"{folder} is in use by another run (lock {self.path}); wait for it, or use "
                               f"another --out or --run-name") from None
        self.file = f

    def release(self):
        if self.file:
            self.file.close()
            self.file = None


def setup_distributed(device_arg):
    """(rank, world, device). Multi-process only when launched by torchrun (RANK in the environment)."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_arg)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device_arg.startswith("cuda"):
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if device_arg.startswith("cuda") else torch.device("cpu")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def load_model(path, dtype, device, trust_remote_code=False):
    """(model in eval mode on `device`, processor) of a saved checkpoint folder. The folder is checked
    first (`check_model_folder`), and a model whose config.json disagrees with its weights (a weight of
    another shape, one missing, one left over) is refused, never run with random weights: ValueError."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    check_model_folder(path)
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        model, info = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                                  output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError) as e:
        raise ValueError(f"cannot load the model: {type(e).__name__}: {str(e)[:300]}") from None
    wrong = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if wrong:
        raise ValueError("config.json disagrees with the weights: " + "; ".join(
            f"{k.replace('_', ' ')}: {sorted(map(str, v))[:3]}{' ...' if len(v) > 3 else ''}" for k, v in wrong.items()))
    return model.to(device).eval(), processor


MAX_HEADER_BYTES = 100 << 20   # a safetensors header (its JSON index) of a 7B model is under 100 kB


def check_model_folder(path):
    """A model folder is what load_model needs before transformers sees it: config.json readable, a processor,
    a tokenizer file, and every *.safetensors whole (its header's length and every tensor's byte range
    within the file: a truncated download or a header claiming a terabyte is named, not a traceback)."""
    def need(names, what):
        if not any(os.path.isfile(os.path.join(path, n)) for n in names):
            raise ValueError(f"no {' or '.join(names)} ({what})")
    need(["config.json"], "the model's configuration")
    need(["preprocessor_config.json", "processor_config.json"], "save the processor with the model")
    need(["tokenizer.json", "tokenizer.model"], "the tokenizer; save it with the model")
    try:
        with open(os.path.join(path, "config.json")) as f:
            assert isinstance(json.load(f), dict)
    except (ValueError, OSError, AssertionError, RecursionError):
        raise ValueError("config.json is not a readable JSON object") from None
    for name in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        file = os.path.join(path, name)
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise ValueError(f"{name}: not a whole safetensors file (header of {n} bytes in a file of {size}); "
                                 f"download it again")
            try:
                header = json.loads(f.read(n))
                ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
            except (ValueError, KeyError, TypeError, IndexError, RecursionError):
                raise ValueError(f"{name}: its header is not a safetensors index; download it again") from None
        if ends and 8 + n + max(ends) > size:
            raise ValueError(f"{name}: truncated ({size} bytes; its tensors need {8 + n + max(ends)}); download it again")


# -----------------------------------------------------------------------------
# files: one atomic writer, JSON and tensor files, the writability check

def write_json(path, obj, indent=None):
    atomic_write(path, lambda f: json.dump(obj, f, indent=indent))


def write_jsonl(path, records):
    atomic_write(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in records))


def read_json(path, log=print):
    """The JSON in `path`, or None if it is absent or unreadable (the stage is then redone)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, OSError, RecursionError) as e:
        log(f"      {path} is unreadable ({e}); recomputing it")
        return None


def save_tensors(obj, path):
    """torch.save of tensors and plain values only (read back by `load_tensors`), atomically."""
    atomic_write(path, lambda f: torch.save(obj, f), "wb")


def load_tensors(path, log=print):
    """A file written by save_tensors, read with weights_only=True: a pickle that would run code, or a
    torn file, is refused with a message and treated as absent."""
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError for planted code, RuntimeError/EOFError for a torn file
        log(f"      {path} is not a plain tensor file and was not loaded ({type(e).__name__}: {str(e)[:160]})")
        return None


def atomic_write(path, write, mode="w"):
    """Write `path` by calling write(f) on a temporary file beside it, then renaming it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DiskFull(errno.ENOSPC, f"the disk is full: {path} was not written (its previous version, "
                                         f"if any, is kept; every file finished before it is kept)") from None
        raise


class DiskFull(OSError):
    """The disk filled up while a file was written; the previous version of that file is kept."""


def unwritable(path, is_folder):
    """Why `path` (a folder, or a file) cannot be written, or None: checked before any work is done."""
    if os.path.exists(path):
        if is_folder != os.path.isdir(path):
            return "exists and is not a folder" if is_folder else "is a folder"
        return None if os.access(path, os.W_OK) else "is not writable"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, so nothing can be created under it"
    return None if os.access(parent, os.W_OK) else f"{parent} is not writable"


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
            except (ValueError, RecursionError) as e:
                log(f"{path}:{n}: skipped, not JSON ({e})")
                continue
            if not isinstance(rec, dict):
                log(f"{path}:{n}: skipped, a JSON {type(rec).__name__} where an object was expected")
                continue
            records.append((n, rec))
    return records


RUN_LOCK = ".mmedpo-run.lock"  # the file a run holds locked in its folder (checkpoint.RunLock)


def guarded_output(path):
    """Why `path` (links resolved) must not be written by a tool's --out, or None: it is a stage's key
    file or a judge cache (finished, possibly paid, scores), another stage's key vouches for it
    (FILE.key.json beside it), or it lies anywhere inside a run folder, an adapter, a model or a stage
    folder (one holding stage keys, such as OUT/pairs and its images/)."""
    real = os.path.realpath(path)
    if real.endswith(".key.json") or os.path.basename(real) == "judge_cache.jsonl":
        return f"a stage file ({os.path.basename(real)}: a stage's key or its finished judge scores)"
    if os.path.exists(real + ".key.json"):
        return f"a stage file ({real}.key.json vouches for its content)"
    folder = os.path.dirname(real)
    while True:                                        # every folder above it, up to the root
        what = os.path.isdir(folder) and _project_folder(folder)
        if what:
            return f"it lies in {what} ({folder})"
        if os.path.dirname(folder) == folder:
            return None
        folder = os.path.dirname(folder)


def _project_folder(folder):
    """What project folder `folder` is (a run folder, an adapter, a model), or None."""
    has = lambda name: os.path.exists(os.path.join(folder, name))
    if has(RUN_LOCK) or has("metrics.json") and has("log.jsonl"):
        return "a run folder"
    if has("adapter_config.json"):
        return "an adapter"
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    if has("config.json") and any(f.endswith((".safetensors", ".bin")) for f in names):
        return "a model"
    if "judge_cache.jsonl" in names or any(f.endswith(".key.json") for f in names):
        return "a stage folder"
    return None


def checked_checkpoint(path, config, inputs, resume_flags, log=print):
    """The checkpoint at `path` if it continues the same computation (its flags and input fingerprints,
    `check_checkpoint`), None if there is none; ValueError naming what differs, or that it is unreadable."""
    if not os.path.exists(path):
        return None
    ck = load_tensors(path, log)
    if ck is None:
        raise ValueError(f"{path} cannot be read as a checkpoint of this project; start a new --run-name")
    changed = check_checkpoint(ck, config, inputs, resume_flags)
    if changed:
        raise ValueError(f"{path} was written with other settings: {'; '.join(changed)}. "
                         f"Resume with the same flags, or start a new --run-name.")
    return ck


def check_checkpoint(ck, config, inputs, flags):
    """The reasons a checkpoint cannot be resumed by this run: each flag in `flags` whose value differs,
    and changed inputs. A resume continues only the same computation."""
    changed = [f"--{k.replace('_', '-')} {ck['config'].get(k)} -> {config.get(k)}" for k in flags
               if ck["config"].get(k) != config.get(k)]
    if ck["config"].get("world") != config.get("world"):
        changed.append(f"processes {ck['config'].get('world')} -> {config.get('world')}")
    for name, value in inputs.items():
        if ck.get("inputs", {}).get(name) != value:
            changed.append(f"the {name} differ")
    return changed


def clear_results(run_dir):
    """Once a run is certain to train (flags, data, any --resume checked), it removes the old results it will
    rewrite: no metrics.json, predictions or pictures stand beside an adapter they do not describe; a refused
    run deletes nothing."""
    import shutil
    for name in ("metrics.json", "predictions.jsonl", "noise_grid.png", "curves.png", "attention.png", "examples.png"):
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))
    shutil.rmtree(os.path.join(run_dir, "adapter"), ignore_errors=True)


# -----------------------------------------------------------------------------
# images a run reads: regular files only, a clear error naming the file, read once

def readable_image(path):
    """True if `path` is a regular image file PIL can read."""
    try:
        read_image(path)
        return True
    except ValueError:
        return False


def read_image(path):
    """A grayscale image, (H, W) float32 in [0, 1], shared by a cache keyed on size and mtime (never modify it).
    16-bit and float images keep their range. Only a regular file is opened (a FIFO would block); a
    missing, special, corrupt or oversized file raises ValueError naming it."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"cannot read image {path}: not a regular file")
    return _read_image(path, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=1024)
def _read_image(path, size, mtime_ns):
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I;16") or im.mode == "I":   # 16-bit grayscale (common in medical PNGs)
                x = np.clip(np.asarray(im, np.float32) / 65535.0, 0, 1)
            elif im.mode == "F":  # float (TIFF): kept if in [0, 1], else stretched to it (never clipped black)
                x = np.nan_to_num(np.asarray(im, np.float32))
                lo, hi = float(x.min()), float(x.max())
                x = x if lo >= 0 and hi <= 1 else (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
            else:
                x = np.asarray(im.convert("L"), np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return x  # shared by every caller of the cache: read it, never write to it
