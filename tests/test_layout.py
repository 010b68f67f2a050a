"""The package's shape: no import cycles, no module reaching into another's private names, private
PyTorch names only behind pyprune_fast/_compat.py, and every op reported per backend."""

import ast
import pathlib
import re

import pytest

import pyprune_fast

ROOT = pathlib.Path(pyprune_fast.__file__).parent
PACKAGE_FILES = sorted(p for p in ROOT.rglob("*.py") if "_csrc" not in p.parts)


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE_FILES}


def top_level_imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(module, names) of each import run when the module is imported (not those inside functions)."""
    tree = ast.parse(path.read_text())
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for base, names in top_level_imports(path):
            for target in [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES] or [base]:
                if target in MODULES and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def test_no_import_cycles():
    graph, state, cycles = import_graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # A package's __init__ importing its own submodules, which import siblings through the package,
    # is how packages work; a cycle is two modules needing each other.
    real = [c for c in cycles if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not real, f"import cycles: {real}"


def test_the_loader_does_not_import_the_ops():
    """The op modules hook into the loader (_extension.after_load), never the other way round."""
    imported = set()
    for node in ast.walk(ast.parse((ROOT / "_extension.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module or ''}.{a.name}" for a in node.names} | {node.module or ""}
        elif isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
    assert not [n for n in imported if n == ".ops" or "ops" in n.split(".")], imported


def test_no_module_imports_private_names_of_another():
    offenders = []
    files = (
        PACKAGE_FILES + sorted((ROOT.parent / "tests").glob("*.py")) + sorted((ROOT.parent / "benchmarks").glob("*.py"))
    )
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                # private modules of this package (_build, _extension, _compat) are its internals; the
                # package imports them, and the tests of the build and the loader (tests/test_<...>.py) may
                private = [n for n in private if not (node.module is None and path.is_relative_to(ROOT))]
                if node.module == "pyprune_fast" and path.parent.name == "tests":
                    private = [n for n in private if not (ROOT / f"{n}.py").is_file()]
                if private:
                    offenders.append(f"{path.name}: from {node.module} import {private}")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id in ("ops", "masks", "reference", "criteria", "sparse", "io") and re.match(
                    r"_[a-z]", node.attr
                ):
                    offenders.append(f"{path.name}: {node.value.id}.{node.attr}")
    assert not offenders, offenders


def test_private_torch_names_only_in_the_compat_shim():
    pattern = re.compile(r"\b(?:torch|nn|F)(?:\.\w+)*\._(?!foreach_)[A-Za-z]\w*")
    found = {p.name: pattern.findall(p.read_text()) for p in PACKAGE_FILES if p.name != "_compat.py"}
    assert not {k: v for k, v in found.items() if v}


def test_backend_info_reports_each_op():
    info = pyprune_fast.backend_info()
    if info["backend"] != "native":
        pytest.skip("reference backend: no compiled ops")
    expected = {
        "saliency",
        "saliency_accumulate_",
        "kth_smallest_counts",
        "radix_histogram",
        "threshold_masks",
        "threshold_apply_",
        "layerwise_masks",
        "per_row_masks",
        "nm_mask",
        "compress_24",
        "decompress_24",
        "sparse24_linear",
        "svd_mean",
        "svd_mean_backward",
    }
    assert set(info["ops"]) == expected
    assert all(kernels["cpu"] for kernels in info["ops"].values())
    assert info["cpu_ops"] is True
    assert info["cuda_ops"] == all(kernels["cuda"] for kernels in info["ops"].values())


def test_every_registered_criterion_is_reachable_by_name():
    from pyprune_fast import criteria

    assert set(criteria.CRITERIA) >= {"magnitude", "snip", "refer", "afr", "wanda", "taylor", "hrank", "l1"}
    for name, fn in criteria.CRITERIA.items():
        assert getattr(criteria, name) is fn and name in criteria.__all__
        assert fn.kind in ("weight", "channel") and fn.needs <= set(criteria.NEEDS), name
