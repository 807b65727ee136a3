"""The reading path of a call: which functions of the project's files it runs, in order, and where a
reader following it would climb back up (a function called from its own file but defined above its
caller). Files read downward have none. Used by tests/test_train.py, tests/test_objectives.py and tests/test_layout.py."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FOLDERS = ("", "guard", "world", "lab")  # the card's files at the top, and the folders named for their reader


def _project(code):
    path = code.co_filename
    return not path.startswith("<") and path.endswith(".py") and \
        os.path.relpath(os.path.dirname(os.path.abspath(path)), ROOT) in (".",) + FOLDERS[1:]


def _name(code):
    return os.path.relpath(os.path.abspath(code.co_filename), ROOT), code.co_qualname, code.co_firstlineno


def project_files():
    """Every .py file of the project: the top level and its folders (not tests/)."""
    return sorted(os.path.join(ROOT, folder, name) for folder in FOLDERS for name in os.listdir(os.path.join(ROOT, folder))
                  if name.endswith(".py"))


def project_calls(fn, *args, **kwargs):
    """(fn's result, calls): one (callee, caller) per call of a function of the project's top-level files
    while fn runs, each (file, qualified name, first line); the caller is the nearest project frame
    below the callee (through torch's module calls or a DataLoader), None if there is none."""
    calls = []

    def profile(frame, event, arg):
        if event == "call" and _project(frame.f_code):
            caller = frame.f_back
            while caller is not None and not _project(caller.f_code):
                caller = caller.f_back
            calls.append((_name(frame.f_code), caller and _name(caller.f_code)))
    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        result = fn(*args, **kwargs)
    finally:
        sys.setprofile(previous)
    return result, calls


def functions(calls):
    """The top-level functions and methods reached, in the order first called (a nested function, lambda
    or comprehension is read as part of the function that holds it)."""
    seen = []
    for callee, _ in calls:
        if "<" not in callee[1] and callee not in seen:
            seen.append(callee)
    return seen


def upward_calls(calls):
    """'file: caller -> callee' for every call whose callee sits above its caller in the same file."""
    return sorted({f"{callee[0]}: {caller[1]} (line {caller[2]}) -> {callee[1]} (line {callee[2]})"
                   for callee, caller in calls if caller is not None and "<" not in callee[1]
                   and callee[0] == caller[0] and callee[2] < caller[2]})


def upward_references(path, project_files):
    """'file: caller -> helper' for every top-level function of `path` that names one of the file's own
    helpers defined above it. A helper is a top-level function no other project file names; the entry
    points a file offers, and names the module itself needs when it is imported (defaults, tables), may
    stand anywhere."""
    import ast
    trees = {p: ast.parse(open(p).read()) for p in project_files}
    tree, module = trees[path], os.path.splitext(os.path.basename(path))[0]
    lines = {n.name: n.lineno for n in tree.body if isinstance(n, ast.FunctionDef)}
    used_elsewhere = set()
    for p, other in trees.items():
        if p != path:
            for n in ast.walk(other):
                if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[-1] == module:
                    used_elsewhere |= {a.name for a in n.names}
                elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == module:
                    used_elsewhere.add(n.attr)
    at_import = set()
    for n in tree.body:
        if not isinstance(n, (ast.FunctionDef, ast.ClassDef)):
            at_import |= {m.id for m in ast.walk(n) if isinstance(m, ast.Name)}
        else:
            parts = getattr(n, "decorator_list", []) + (n.args.defaults + n.args.kw_defaults
                                                        if isinstance(n, ast.FunctionDef) else n.bases)
            at_import |= {m.id for part in parts if part is not None for m in ast.walk(part) if isinstance(m, ast.Name)}
    helpers = {name for name in lines if name not in used_elsewhere and name not in at_import}
    found = set()
    for n in tree.body:
        bodies = [n] if isinstance(n, ast.FunctionDef) else [m for m in getattr(n, "body", []) if isinstance(m, ast.FunctionDef)]
        for fn in bodies:
            for m in ast.walk(fn):
                if isinstance(m, ast.Name) and m.id in helpers and lines[m.id] < fn.lineno:
                    found.add(f"{os.path.relpath(path, ROOT)}: {fn.name} (line {fn.lineno}) -> {m.id} (line {lines[m.id]})")
    return sorted(found)
