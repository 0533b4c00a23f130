"""The architecture holds: layers import only downwards, files stay small, every concept has one home that the
rest reads, the map in docs/architecture.md names every file, and every internal import resolves."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lite", "quant", "offload")
MAX_LINES = 400


def _py_files(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (REPO / root).rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) of every import in a file, function-level ones included."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((module, [a.name for a in node.names], node.lineno))
    return out


def _top(module: str) -> str:
    return module.split(".")[0]


def _module_of(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph(files: list[Path], at_import_only: bool = False) -> dict[str, set[str]]:
    """module -> our modules it imports, at module level or inside functions (TYPE_CHECKING ones too); with
    `at_import_only`, only what importing the module runs (no function bodies, no TYPE_CHECKING block).

    `from pkg import name` points at `pkg.name` when that is a module of ours, else at `pkg`; a package's
    `__init__` run on the way to a submodule is not an edge (it is not what the file asked for)."""
    modules = {_module_of(p) for p in files}
    graph: dict[str, set[str]] = {}
    for p in files:
        here = _module_of(p)
        edges = graph.setdefault(here, set())
        lines = _module_level_lines(p) if at_import_only else None
        for module, names, line in _imports(p):
            if lines is not None and line not in lines:
                continue
            targets = [f"{module}.{n}" if f"{module}.{n}" in modules else module for n in names] or [module]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != here:
                    edges.add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as a closed path naming it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_closed_path(graph, set(g)) for g in groups]


def _closed_path(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """One cycle through the group's first module, e.g. [a, b, c, a] (breadth-first, inside the group)."""
    start = min(group)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(group)


@pytest.mark.parametrize("layer, forbidden", [("offload", {"lite", "quant"}), ("quant", {"lite"})])
def test_lower_layers_never_import_upwards(layer: str, forbidden: set[str]) -> None:
    bad = [f"{p.relative_to(REPO)}:{line} imports {m}" for p in _py_files(layer) for m, _, line in _imports(p)
           if _top(m) in forbidden]
    assert bad == []


def test_sampling_imports_nothing_else_from_lite() -> None:
    bad = [f"{p.relative_to(REPO)}:{line} imports {m}" for p in _py_files("lite/sampling")
           for m, _, line in _imports(p) if _top(m) == "lite" and not m.startswith("lite.sampling")]
    assert bad == []


def test_model_layer_does_not_reach_into_runtime_or_cli() -> None:
    bad = [f"{p.relative_to(REPO)}:{line} imports {m}" for p in _py_files("lite/model") for m, _, line in _imports(p)
           if m.startswith(("lite.runtime", "lite.cli", "lite.server"))]
    assert bad == []


def test_no_import_cycles_between_our_modules() -> None:
    """Function-level imports count: an import moved into a function still makes the two modules one."""
    cycles = _cycles(_import_graph(_py_files(*PACKAGES)))
    assert [" -> ".join(c) for c in cycles] == []


def _at_import_graph(extra: tuple[str, str] | None = None) -> dict[str, set[str]]:
    """What importing each module runs, package `__init__`s included (importing a.b.c from outside a.b runs
    a/b/__init__ first); `extra` adds one edge, as if that import moved to module level."""
    graph = _import_graph(_py_files(*PACKAGES), at_import_only=True)
    if extra is not None:
        graph[extra[0]].add(extra[1])

    def ancestors(m: str) -> set[str]:
        return {m.rsplit(".", k)[0] for k in range(1, m.count(".") + 1)} & set(graph)

    for m in graph:
        graph[m] |= {a for t in list(graph[m]) for a in ancestors(t) - ancestors(m) - {m}}
    return graph


def test_nothing_goes_round_at_import_time() -> None:
    """What importing a module runs has no cycle either: one fails as a partially initialized module, depending
    on which side is imported first."""
    assert [" -> ".join(c) for c in _cycles(_at_import_graph())] == []


def test_the_cycle_finder_names_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_model_layer_asks_no_backend_about_its_limits() -> None:
    """The backends own their limits (`Backend.accepts`, asked by quant's chain): the precision tables name
    formats only and import no backend."""
    bad = [f"lite/model/precision.py:{line} imports {m}" for m, _, line in _imports(REPO / "lite/model/precision.py")
           if m.startswith("quant.backends")]
    assert bad == []


def _function_level_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, absolute module, says why) of every module imported inside a function or method of a file.

    "Says why": a comment on the import's line, or on the comment line(s) right above it (a run of imports under
    one comment shares it)."""
    tree = ast.parse(path.read_text(), str(path))
    lines = path.read_text().splitlines()
    ours = {_module_of(p) for p in _py_files(*PACKAGES)}
    resolved: dict[int, list[str]] = {}
    for module, names, line in _imports(path):  # `from lite.cli import run` is lite.cli.run
        resolved.setdefault(line, []).extend(
            {f"{module}.{n}" if f"{module}.{n}" in ours else module for n in names} or {module})
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node is not fn:
                i = node.lineno - 1
                says = "#" in lines[node.end_lineno - 1] or "#" in lines[i]
                while not says and i > 0 and lines[i - 1].strip().startswith(("#", "from ", "import ")):
                    i -= 1
                    says = lines[i].strip().startswith("#") or "#" in lines[i]
                out += [(node.lineno, module, says) for module in resolved.get(node.lineno, [])]
    return sorted(set(out))


#: Libraries kept off the start-up path (`python -X importtime`): torch takes seconds, and the CLI parses and sets
#: the thread environment before it; transformers and diffusers take seconds; bitsandbytes and optimum-quanto pull
#: in torch._dynamo; huggingface_hub's snapshot_download and uvicorn/fastapi (`serve` only) take a tenth of a
#: second or more; PIL and numpy are what `--help` must not import either (tests/cli/test_cli_help.py). psutil,
#: tokenizers and safetensors take milliseconds: they are imported where they are used.
HEAVY_LIBRARIES = frozenset({"torch", "transformers", "diffusers", "bitsandbytes", "optimum", "huggingface_hub",
                             "uvicorn", "fastapi", "PIL", "numpy",
                             "llama_cpp", "gguf"})  # the optional llama.cpp engine (a native library)


def _module_level_lines(path: Path) -> set[int]:
    """Lines of the imports that importing the file runs (not in functions, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), str(path))
    lazy = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
                isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)):
            lazy |= {id(n) for n in ast.walk(node)}
    return {n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in lazy}


def _heavy_at_import() -> dict[str, set[str]]:
    """Our module -> the heavy libraries importing it loads (through our modules' module-level imports)."""
    files = {_module_of(p): p for p in _py_files(*PACKAGES)}
    at_import = {m: _module_level_lines(p) for m, p in files.items()}
    direct = {m: {_top(mod) for mod, _, line in _imports(p) if line in at_import[m]} for m, p in files.items()}
    level = _import_graph(list(files.values()), at_import_only=True)
    for m in files:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        level[m] |= {p for p in (m.rsplit(".", k)[0] for k in range(1, m.count(".") + 1)) if p in files}
    heavy: dict[str, set[str]] = {}

    def visit(m: str, seen: set[str]) -> set[str]:
        if m in heavy:
            return heavy[m]
        out = direct[m] & HEAVY_LIBRARIES
        for t in level[m] - seen:
            out |= visit(t, seen | {m})
        if not seen:
            heavy[m] = out
        return out

    for m in files:
        visit(m, set())
    return heavy


def _is_lazy_package_attribute(path: Path, line: int) -> bool:
    """An import inside a package `__init__`'s module-level `__getattr__` (PEP 562): the public name
    (`from lite import OvisPipeline`) without making every `import lite.x` load what it names."""
    if path.name != "__init__.py":
        return False
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            return node.lineno <= line <= (node.end_lineno or node.lineno)
    return False


def test_function_level_imports_only_keep_heavy_libraries_off_the_start_up_path() -> None:
    """An import inside a function hides a dependency. It is allowed only where it keeps a heavy library
    (`HEAVY_LIBRARIES`) off the start-up path, directly or through our module that imports one (and that the
    importing module does not load already), and a comment says so. Never the standard library, nor one of our
    modules that defers nothing (that only hid a cycle, or nothing). The one other case: the import would go
    round at import time only through a package `__init__` that re-exports (lite.cli's `main` for the console
    script), which the module graph itself does not hold; a comment says so there too."""
    import sys

    heavy = _heavy_at_import()
    bad = []
    for p in _py_files(*PACKAGES):
        for line, module, says in _function_level_imports(p):
            where = f"{p.relative_to(REPO)}:{line} imports {module}"
            if _top(module) in PACKAGES:
                target = module
                while target and target not in heavy:
                    target = target.rpartition(".")[0]
                deferred = heavy.get(target, set()) - heavy[_module_of(p)]
                if _is_lazy_package_attribute(p, line):
                    continue
                if not deferred and not _cycles(_at_import_graph((_module_of(p), target))):
                    bad.append(f"{where} (defers no heavy library this module does not load already: import it "
                               f"at module level)")
                elif not deferred and not says:
                    bad.append(f"{where} (would go round through a package init at import time: say so)")
                elif not says:
                    bad.append(f"{where} (defers {sorted(deferred)}: say in a comment why it waits)")
            elif _top(module) in sys.stdlib_module_names:
                bad.append(f"{where} (the standard library: import it at module level)")
            elif _top(module) not in HEAVY_LIBRARIES:
                bad.append(f"{where} (not a heavy library: import it at module level, or name it heavy here)")
            elif _top(module) in heavy[_module_of(p)]:
                bad.append(f"{where} (this module loads it already: import it at module level)")
            elif not says:
                bad.append(f"{where} (a heavy library: say in a comment why it waits)")
    assert bad == []


def test_no_file_is_larger_than_the_limit() -> None:
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in _py_files(*PACKAGES)}
    assert {k: v for k, v in sizes.items() if v > MAX_LINES} == {}


def test_old_catch_all_modules_are_gone() -> None:
    assert not (REPO / "lite/quantization.py").exists()
    assert not (REPO / "lite/inspect.py").exists()  # shadowed the standard library's inspect


def _names_a_type(node: ast.AST) -> bool:
    """`type(x).__name__` / `.__module__` / `.__qualname__` (or any attribute chain ending in them)."""
    return isinstance(node, ast.Attribute) and node.attr in ("__name__", "__module__", "__qualname__")


def test_the_cli_matches_no_error_by_name() -> None:
    """Errors are caught by type (`offload.errors.UserError`): no comparison or membership test on a class's
    or module's name anywhere in the front ends (a name may still appear in a message)."""
    bad = []
    for p in _py_files("lite/cli", "lite/server"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Compare) and any(_names_a_type(n) or any(_names_a_type(m) for m in ast.walk(n))
                                                     for n in (node.left, *node.comparators)):
                bad.append(f"{p.relative_to(REPO)}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("startswith", "endswith") \
                    and any(_names_a_type(m) for m in ast.walk(node.func.value)):
                bad.append(f"{p.relative_to(REPO)}:{node.lineno}")
    assert bad == []


def test_every_user_error_shares_one_base() -> None:
    from offload import BudgetError
    from offload.errors import UserError
    from quant import QuantBackendError, QuantFormatError

    from lite import errors

    for cls in (BudgetError, QuantBackendError, QuantFormatError, errors.InputError, errors.ConfigError,
                errors.CheckpointError, errors.DeviceError, errors.OutputError, errors.Cancelled):
        assert issubclass(cls, UserError), cls


def test_every_internal_import_resolves() -> None:
    """Moved modules leave no stale import anywhere (scripts and tests included, function-level ones too)."""
    bad = []
    for p in _py_files(*PACKAGES, "scripts", "tests"):
        for module, names, line in _imports(p):
            if _top(module) not in PACKAGES:
                continue
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as exc:
                bad.append(f"{p.relative_to(REPO)}:{line}: {exc}")
                continue
            for name in names:
                if name != "*" and not hasattr(mod, name):
                    try:
                        importlib.import_module(f"{module}.{name}")
                    except ModuleNotFoundError:
                        bad.append(f"{p.relative_to(REPO)}:{line}: {module} has no {name}")
    assert bad == []


def test_every_backend_implements_the_protocol() -> None:
    from quant.backends import REGISTRY, auto_chain
    from quant.backends.base import Backend
    from quant.formats import FORMATS

    for name, backend in REGISTRY.items():
        assert isinstance(backend, Backend), name
        assert backend.name == name
        assert set(backend.auto) <= set(FORMATS) and set(backend.formats) <= set(FORMATS)
    for fmt in FORMATS:  # every format finds a home on any device: the chain ends in a torch backend
        assert auto_chain(fmt), fmt


def test_the_model_declares_what_it_is(tiny_dir: Path) -> None:
    """The declared module paths, block lists and tied key are the real model's."""
    import torch
    from torch import nn

    from lite.model.config import load_config
    from lite.model.modeling_ovis_u1 import OvisU1

    arch = OvisU1.architecture
    with torch.device("meta"):
        model = OvisU1(load_config(tiny_dir))
    for component, path in arch.components.items():
        root = model.get_submodule(path)
        for blocks in arch.block_lists.get(component, ()):
            assert isinstance(root.get_submodule(blocks), nn.ModuleList), (component, blocks)
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert set(arch.tied_weights_keys) <= names
    head, embed = model.get_submodule(arch.head_module), model.get_submodule(arch.embed_module)
    assert isinstance(head, nn.Linear) and isinstance(embed, nn.Embedding)
    assert set(arch.components) == {"llm", "vision", "visual_head", "vte", "yak", "vae"}
    every = {n for n, _ in model.named_parameters()}
    assert all(any(n.startswith(arch.prefix(c)) for c in arch.components) for n in every)


def test_the_architecture_map_names_every_file() -> None:
    text = (REPO / "docs/architecture.md").read_text()
    missing = [str(p.relative_to(REPO)) for p in _py_files(*PACKAGES)
               if p.name not in ("__init__.py", "__main__.py") and str(p.relative_to(REPO)) not in text]
    assert missing == []


def _headings(doc: str) -> set[str]:
    import re

    text = (REPO / "docs" / doc).read_text()
    return set(re.findall(r"^#+ (\d+(?:\.\d+)?)\.? ", text, flags=re.M))


def test_every_cited_section_lives_in_the_repo() -> None:
    """Comments cite `spec §3.8` (docs/ovis_u1_spec.md) and `docs/deps.md §3`: each section must exist here."""
    import re

    spec, deps = _headings("ovis_u1_spec.md"), _headings("deps.md")
    bad = []
    for p in _py_files(*PACKAGES, "scripts", "tests"):
        text = p.read_text()
        for sec in re.findall(r"spec §(\d+(?:\.\d+)?)", text):
            if sec not in spec:
                bad.append(f"{p.relative_to(REPO)}: spec §{sec}")
        for sec in re.findall(r"deps\.md §(\d+(?:\.\d+)?)", text):
            if sec not in deps:
                bad.append(f"{p.relative_to(REPO)}: deps.md §{sec}")
        if "shared" + "/docs" in text:
            bad.append(f"{p.relative_to(REPO)}: cites the shared folder's docs instead of docs/")
    assert bad == []
