"""What a stage's cache key knows of the code that computes it, and why an entry is not a cache hit.

A stage's key hashes its configuration, its inputs' keys and ``code_version(stage)``: the code of every
segsde module its job imports, directly or through others (function-level imports too), so a fix reruns
the stages whose code it touches and what reads their outputs, and nothing else. The code is its syntax
tree without docstrings (comments never reach it), so rewording an explanation reruns nothing. Modules that
cannot change a number (MLflow logging, storage I/O, errors, figures) are left out: editing them reruns nothing.

Every computed entry leaves its key's description under ``<storage>/cache/keys/<entry>.json``; a miss is
explained by the difference to the nearest earlier entry of the same stage (and row, budget, seed).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from pathlib import Path

from segsde.storage import Location, cache_key

PACKAGE = Path(__file__).resolve().parent.parent
STAGE_JOBS = {"data": ("segsde.data.synth.generate", "segsde.data.store"), "sde": ("segsde.sde.run",),
              "export": ("segsde.sde.export",), "select": ("segsde.selection.run",), "train": ("segsde.trainer.run",)}
STAGES = tuple(STAGE_JOBS)  # in the order they feed each other
NOT_RESULTS = ("segsde.tracking", "segsde.progress", "segsde.storage", "segsde.errors", "segsde.trainer.figures", "segsde.selection.figures",
               "segsde.data.preview")
KEYS_DIR = "keys"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the segsde modules it imports anywhere in its body}, parsed from the sources (nothing is imported)."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


@functools.cache
def code_files(stage: str) -> dict[str, str]:
    """{module: SHA-256 prefix of its source} for every module ``stage``'s job runs (NOT_RESULTS left out)."""
    graph = import_graph()
    seen, todo = set(), list(STAGE_JOBS[stage])
    while todo:
        module = todo.pop()
        if module not in seen and module not in NOT_RESULTS:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    files = {m: PACKAGE.parent / (m.replace(".", "/") + ".py") for m in seen}
    files = {m: p if p.is_file() else p.with_suffix("") / "__init__.py" for m, p in files.items()}
    return {m: code_fingerprint(p.read_text()) for m, p in sorted(files.items())}


def code_fingerprint(source: str) -> str:
    """SHA-256 prefix of what a module computes: its syntax tree with docstrings removed (no comments,
    no line numbers), so that only a change to the code changes it."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:12]


def code_version(stage: str) -> str:
    return cache_key(code_files(stage))


def describe(stage: str, config: dict) -> dict:
    """What a stage entry's key hashes, spelled out: its configuration (inputs included) and its code, file by file."""
    return {"config": config, "code": code_files(stage)}


def remember(storage: Location, name: str, description: dict) -> None:
    """Keep the description of entry ``name`` (written once; the name holds its key)."""
    where = storage.child("cache", KEYS_DIR, f"{name}.json")
    if not where.is_file():
        where.write_text(json.dumps(description, sort_keys=True, default=str))


def why_missed(storage: Location, name: str, prefix: str, description: dict) -> str:
    """A plain reason why entry ``name`` is not cached: what differs from the nearest entry whose name
    starts with ``prefix`` (the stage, and a trial's row, budget and seed)."""
    folder = storage.child("cache", KEYS_DIR)
    files = folder.listing()
    earlier = sorted((f for f in files if f.startswith(prefix) and f != f"{name}.json"), key=lambda f: -files[f][1])
    if not earlier:
        return "nothing like it was computed before"
    best = None
    for f in earlier[:50]:  # the newest first: of equally near ones, the last computed
        diff = differences(json.loads(folder.child(f).read_text()), description)
        if best is None or len(diff) < len(best[1]):
            best = (f.removesuffix(".json"), diff)
    other, diff = best
    code = [k.removeprefix("code.") for k in diff if k.startswith("code.")]
    config = [k.removeprefix("config.") for k in diff if not k.startswith("code.")]
    parts = ([f"new code in {', '.join(code[:3])}{' and more' if len(code) > 3 else ''}"] if code else []) + \
            ([f"a different {', '.join(config[:3])}{' and more' if len(config) > 3 else ''}"] if config else [])
    return f"{' and '.join(parts) or 'the same description under another key'} than {other}"


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested descriptions."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += differences(x, y, f"{prefix}{k}.")
        elif json.dumps(x, sort_keys=True, default=str) != json.dumps(y, sort_keys=True, default=str):
            out.append(f"{prefix}{k}")
    return out


def entry_key(stage: str, config: dict) -> str:
    """The cache key of a ``stage`` entry: its configuration (its inputs' keys included) and its code."""
    return cache_key({**config, "code": code_version(stage)})
