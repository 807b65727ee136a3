"""The layout's rules, read off the source: the top level is the card's six files; nothing imports
upward; no circles; mmedpo.py, lora.py and noise.py import no project file (they work copied alone);
guard/ imports no project file; the card's files reach lab/ only through train.py's objective table.

    python -m pytest -q tests/test_layout.py
"""
import ast
import os

import reading

ROOT = reading.ROOT
CARD = {"mmedpo", "data", "noise", "score", "lora", "train"}
# who may import whom: a module imports only modules of a lower rank (the offline rule judge is a
# stdlib-only leaf that score.py's default judge and data.py's answer parsing read)
RANK = {"guard.checkpoint": 0, "guard.judge": 0, "mmedpo": 1, "lora": 1, "noise": 1, "world.rule_judge": 1,
        "score": 2, "data": 3, "world.synthetic": 4, "world.real_data": 4, "world.oracle": 4, "world.eval": 5, "world.mechanism": 5, "world.flags": 5,
        "lab.hscr": 6, "lab.fire": 6, "train": 7, "lab.study": 8, "lab.score_cli": 8, "lab.bench": 9,
        "lab.instrument": 9, "lab.memory": 1, "lab.bench_trl": 10}


def modules():
    """{module name: path} of every project file (the folders' __init__.py hold only a docstring)."""
    out = {}
    for path in reading.project_files():
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        if not rel.endswith("__init__"):
            out[rel] = path
    return out


def project_imports(path, names):
    """The project modules a file imports, anywhere in it (module level or inside a function)."""
    found = set()
    for n in ast.walk(ast.parse(open(path).read())):
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names if a.name in names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            if n.module in names:
                found.add(n.module)
            found |= {f"{n.module}.{a.name}" for a in n.names if f"{n.module}.{a.name}" in names}
    return found


def test_the_top_level_is_the_card():
    scripts = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert scripts == CARD
    assert set(modules()) == set(RANK), "a new file needs its place in RANK (and in the README's map)"


def test_nothing_imports_upward_and_the_copyable_files_import_no_project_file():
    mods = modules()
    graph = {m: project_imports(p, set(mods)) for m, p in mods.items()}
    upward = sorted(f"{m} imports {i}" for m, imps in graph.items() for i in imps if RANK[i] >= RANK[m])
    assert upward == []                       # ranks strictly fall along every import: no circle is possible
    for alone in ("mmedpo", "lora", "noise", "guard.checkpoint", "guard.judge", "world.rule_judge"):
        assert graph[alone] == set(), alone
    card_into_lab = sorted(f"{m} imports {i}" for m, imps in graph.items() if m in CARD and m != "train"
                           for i in imps if i.startswith("lab."))
    assert card_into_lab == []
    assert {i for i in graph["train"] if i.startswith("lab.")} == {"lab.hscr", "lab.fire"}  # the objective table's rows


def test_the_layout_check_sees_an_upward_import(tmp_path):
    """The check itself can fail: a file that imports one of a higher rank is found."""
    bad = tmp_path / "noise.py"
    bad.write_text("import torch\nfrom world import synthetic\n\ndef f():\n    import train\n")
    assert project_imports(str(bad), {"world.synthetic", "train", "data"}) == {"world.synthetic", "train"}
