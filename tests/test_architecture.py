"""The rules of docs/architecture.md: import floors, public names only, importable __all__."""

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# docs/architecture.md, "The floors": a package imports only from lower floors.
FLOORS = {
    "pallas_kernels": 0,
    "jaxquant.data": 0,
    "jaxquant.numerics": 1,
    "jaxquant.vq": 2,
    "jaxquant.nn": 3,
    "jaxquant.optim": 3,
    "jaxquant.models": 4,
    "jaxquant.ptq": 4,
    "jaxquant.eval": 5,
    "jaxquant.train": 6,
}
PACKAGES = ["jaxquant", *FLOORS]


def _package_of(module: str) -> str | None:
    for pkg in sorted(FLOORS, key=len, reverse=True):
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return None


def _modules():
    for path in sorted((ROOT / "jaxquant").rglob("*.py")) + sorted(
        (ROOT / "pallas_kernels").rglob("*.py")
    ):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(parts), path


def _imports(path: pathlib.Path, module: str):
    """(imported module, imported names) for every import statement of the file."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            yield base, tuple(a.name for a in node.names)


MODULES = list(_modules())


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_point_down_the_floors(module, path):
    own = _package_of(module)
    if own is None:  # jaxquant/__init__.py re-exports every floor
        return
    for imported, names in _imports(path, module):
        targets = [imported] + [f"{imported}.{n}" for n in names]
        for target in targets:
            other = _package_of(target)
            if other is None or other == own:
                continue
            assert FLOORS[other] < FLOORS[own], (
                f"{module} (floor {FLOORS[own]}) imports {target} (floor {FLOORS[other]})"
            )


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_no_private_name_is_imported_across_modules(module, path):
    tree = ast.parse(path.read_text())
    aliases = {}  # local name -> imported jaxquant/pallas_kernels module
    for imported, names in _imports(path, module):
        if _package_of(imported) is None and not imported.startswith("jaxquant"):
            continue
        for name in names:
            assert not name.startswith("_"), f"{module} imports private {imported}.{name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            ("jaxquant", "pallas_kernels")
        ):
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(("jaxquant", "pallas_kernels")):
                    aliases[a.asname or a.name.split(".")[0]] = a.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
        ):
            raise AssertionError(
                f"{module}:{node.lineno} reads private {aliases[node.value.id]}.{node.attr}"
            )


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_no_module_is_imported_by_a_name_its_package_rebinds(module, path):
    """``jaxquant.numerics.gptq`` is the function ``gptq`` (the package exports it), not the
    module of that name: inside the package, ``from jaxquant.numerics import gptq as gptq_lib``
    gets the module only because the package is still half-imported. Import such a sibling's
    names from the module itself (outside the package, the name is the function, as meant)."""
    import types

    for imported, names in _imports(path, module):
        if not module.startswith(imported + ".") or imported == "jaxquant":
            continue
        try:
            package = importlib.import_module(imported)
        except ImportError:
            continue
        for name in names:
            try:
                importlib.import_module(f"{imported}.{name}")
            except ImportError:
                continue  # a name, not a submodule
            assert isinstance(getattr(package, name, None), types.ModuleType), (
                f"{module} imports module {imported}.{name}, which the package rebinds to "
                f"{type(getattr(package, name)).__name__} {name!r}: import from "
                f"{imported}.{name} instead."
            )


@pytest.mark.parametrize("package", PACKAGES)
def test_every_name_in_all_imports_with_star(package):
    mod = importlib.import_module(package)
    names = getattr(mod, "__all__", None)
    assert names, f"{package} has no __all__"
    namespace = {}
    exec(f"from {package} import *", namespace)  # noqa: S102
    missing = [n for n in names if n not in namespace]
    assert not missing, f"{package}.__all__ names {missing} that `import *` does not give"
    assert len(set(names)) == len(names), f"{package}.__all__ repeats names"


def test_the_top_level_gives_the_everyday_names():
    import jaxquant as jq

    for name in (
        "quantize",
        "fake_quant",
        "QArray",
        "VQArray",
        "Quantizer",
        "ScalarQuantizer",
        "VectorQuantizer",
        "get_quantizer",
        "INT4_G128",
        "NVFP4",
        "QuantRule",
        "QuantConfig",
        "intercept",
        "freeze",
        "serving_params",
        "quantize_model",
        "adamw",
        "kernel_options",
    ):
        assert hasattr(jq, name), name


def test_pallas_kernels_export_their_ops_as_their_own_names():
    import pallas_kernels as pk
    from pallas_kernels.codebook_matmul import api as codebook_api
    from pallas_kernels.hadamard import api as hadamard_api
    from pallas_kernels.quantized_matmul import api as quantized_api

    assert pk.quantized_matmul is quantized_api.quantized_matmul
    assert pk.codebook_matmul is codebook_api.codebook_matmul
    assert pk.hadamard is hadamard_api.hadamard
