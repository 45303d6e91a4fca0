"""The notebooks in colabs/: each .ipynb is the jupytext pair of its reviewed .py (percent
format), is stored without outputs, installs jaxquant from the repository on Colab, has an
"Open in Colab" link in the README, and runs top to bottom at the small size
(``JAXQUANT_COLAB_SIZE=small``), one test per notebook so they run in parallel."""

import os
import pathlib
import re
import shutil
import tempfile

import jupytext  # the notebooks extra, which the test extra installs
import nbclient
import nbformat
import pytest
from jupyter_client.manager import AsyncKernelManager

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLABS = sorted((ROOT / "colabs").glob("[0-9][0-9]_*.py"))
NAMES = [p.stem for p in COLABS]
# Where Colab installs jaxquant from, and where the README's badges open the notebooks.
REPOSITORY = "github.com/jaxquant/jaxquant"
SYNC = "make colabs (jupytext --to ipynb colabs/[0-9]*.py) rewrites the .ipynb from the .py"


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_the_five_notebooks_exist():
    assert NAMES == [
        "01_formats_and_rate_distortion",
        "02_quantize_your_own_flax_model",
        "03_pretrained_llm",
        "04_low_bit_optimizers",
        "05_low_precision_training",
    ]
    extra = {p.stem for p in (ROOT / "colabs").glob("*.ipynb")} - set(NAMES)
    assert not extra, f"colabs/ has notebooks without a .py pair: {sorted(extra)}"


@pytest.mark.parametrize("path", COLABS, ids=NAMES)
def test_pair_in_sync_and_stripped(path):
    text = jupytext.read(path)
    ipynb = path.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing: {SYNC}"
    nb = nbformat.read(ipynb, as_version=4)
    nbformat.validate(nb)
    assert _cells(nb) == _cells(text), f"{ipynb.name} differs from {path.name}: {SYNC}"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{ipynb.name} cell {i} has outputs: store notebooks stripped ({SYNC})"
            )
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("path", COLABS, ids=NAMES)
def test_installs_on_colab_and_is_linked_from_the_readme(path):
    nb = jupytext.read(path)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert "google.colab" in code[0] and f"git+https://{REPOSITORY}" in code[0], (
        f"{path.name}: the first code cell must install jaxquant on Colab from {REPOSITORY}"
    )
    assert "JAXQUANT_COLAB_SIZE" in "\n".join(code), f"{path.name} ignores the small size"
    readme = (ROOT / "README.md").read_text()
    link = f"https://colab.research.google.com/{REPOSITORY}/blob/main/colabs/{path.stem}.ipynb"
    assert link.replace("github.com/", "github/") in readme, f"README has no Colab link to {link}"


@pytest.mark.parametrize("path", COLABS, ids=NAMES)
def test_runs_top_to_bottom(path, tmp_path, monkeypatch):
    # The kernel inherits this environment: the small size, one CPU device (as a user has).
    monkeypatch.setenv("JAXQUANT_COLAB_SIZE", "small")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    )
    if flags.strip():
        monkeypatch.setenv("XLA_FLAGS", flags.strip())
    else:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
    nb = nbformat.read(path.with_suffix(".ipynb"), as_version=4)
    # IPC sockets, not TCP ports, so two workers' kernels cannot collide on a port; in a short
    # directory of their own (a Unix socket's path is limited to about 100 bytes)
    sockets = tempfile.mkdtemp(prefix="jqk")
    km = AsyncKernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(sockets, "k"))
    client = nbclient.NotebookClient(
        nb, km=km, timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    try:  # the kernel inherits this worker's CPU (tests/conftest.py pins each worker)
        client.execute()  # raises CellExecutionError naming the cell and its traceback
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
