"""The layers run one way (docs/architecture.md): the core imports none of the three folders; curation and
training build on the core; pipelines on curation and the core; the command line and the demo on all. Every
import counts, those inside functions and under TYPE_CHECKING too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# installed package of each source folder (pyproject.toml's package-dir)
PACKAGES = {"subjectpairs": "subjectpairs", "curation": "subjectpairs.curation",
            "pipelines": "subjectpairs.pipelines", "training": "subjectpairs.training"}
TOP = {"subjectpairs.cli", "subjectpairs.demo"}
ALLOWED = {
    "core": {"core"},
    "curation": {"core", "curation"},
    "training": {"core", "training"},
    "pipelines": {"core", "curation", "pipelines"},
    "top": {"core", "curation", "training", "pipelines", "top"},
}


def layer(module: str) -> str | None:
    if any(module == top or module.startswith(top + ".") for top in TOP):
        return "top"
    for folder in ("curation", "pipelines", "training"):
        if module == f"subjectpairs.{folder}" or module.startswith(f"subjectpairs.{folder}."):
            return folder
    return "core" if module == "subjectpairs" or module.startswith("subjectpairs.") else None


def source_modules() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imported_modules(module: str, path: Path) -> list[tuple[int, str]]:
    """Every module that ``module`` imports (``from X import name`` counts as X and X.name), anywhere in it."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def test_every_import_follows_the_layers():
    modules = source_modules()
    assert {"subjectpairs.corpus.reader", "subjectpairs.cli", "subjectpairs.curation.review",
            "subjectpairs.training.blip_diffusion", "subjectpairs.pipelines.build"} <= set(modules)
    wrong = []
    for module, path in modules.items():
        source = layer(module)
        for line, target in imported_modules(module, path):
            target_layer = layer(target)
            if target in modules or target.rpartition(".")[0] in modules or target_layer is not None:
                if target_layer is not None and target_layer not in ALLOWED[source]:
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: {source} imports {target} ({target_layer})")
    assert wrong == []


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """A cross-layer import hidden in a function is found (the rule the test above enforces)."""
    hidden = tmp_path / "review.py"
    hidden.write_text("def f():\n    from subjectpairs.training.data import BatchReader\n    from ..pipelines import x\n")
    found = [target for _, target in imported_modules("subjectpairs.curation.review", hidden)]
    assert "subjectpairs.training.data" in found and "subjectpairs.pipelines" in found
    assert layer("subjectpairs.training.data") not in ALLOWED["curation"]


def test_the_corpus_format_is_defined_once():
    """Readers, writers and file names of the corpus live in subjectpairs/corpus/ (and the config name in
    subjectpairs/configfile.py); no other module defines its own copy."""
    shared = {"read_exclude", "iter_shard", "read_shard", "resolve_shards", "shard_tar_writer", "publish_file",
              "file_sha256", "sample_key", "MANIFEST_FILE", "REJECTS_FILE", "STATS_FILE", "CONFIG_FILE",
              "INPUT_MEMBER", "TARGET_MEMBER", "META_MEMBER", "LATENT_MEMBER", "IMAGE_SUFFIXES"}
    definitions: dict[str, list[str]] = {}
    for module, path in source_modules().items():
        for node in ast.parse(path.read_text()).body:
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
                target.id for target in getattr(node, "targets", []) if isinstance(target, ast.Name)]
            for name in set(names) & shared:
                definitions.setdefault(name, []).append(module)
    assert {name: places for name, places in definitions.items() if len(places) > 1} == {}
    assert definitions["read_exclude"] == ["subjectpairs.corpus.layout"]
    assert definitions["CONFIG_FILE"] == ["subjectpairs.configfile"]


def test_only_storage_imports_fsspec():
    """Where bytes live is decided in subjectpairs/storage.py alone: no other module imports fsspec, not even
    inside a function."""
    importers = {module for module, path in source_modules().items()
                 for _, target in imported_modules(module, path) if target.split(".")[0] == "fsspec"}
    assert importers == {"subjectpairs.storage"}


def test_every_package_is_in_the_installed_list():
    """pyproject.toml lists packages by hand: a folder missing there works in an editable install and is
    absent from a wheel."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = set()
    for package, folder in tool["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join((package, *init.parent.relative_to(ROOT / folder).parts)))
    assert found - listed == set()


def test_one_place_decides_whether_a_model_runs_on_the_gpu():
    deciders = sorted(module for module, path in source_modules().items() if "cuda.is_available(" in path.read_text())
    assert deciders == ["subjectpairs.devices"]


def test_auto_device_is_the_gpu_only_when_torch_sees_one(monkeypatch):
    import torch

    from subjectpairs.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"
