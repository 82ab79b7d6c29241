"""The tutorial notebooks (tutorial/*.ipynb) run from top to bottom, offline, on CPU, within a time budget.

Each notebook is executed by a fresh Jupyter kernel (nbclient), working directory tutorial/, as a reader would
run it; any cell that raises fails its test. Notebooks that need the released tokenizer skip, saying how to
get it, when it is in none of the places conftest.tokenizer_folder looks.
"""
import glob
import os
import re
import time

import pytest

from conftest import tokenizer_folder

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIAL = os.path.join(ROOT, "tutorial")
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(TUTORIAL, "*.ipynb")))

NEEDS_TOKENIZER = ("06_sequence_format.ipynb", "08_training_lab.ipynb")  # the others run anywhere
CELL_TIMEOUT_S = 120      # one cell; the slowest (notebook 8's training loop) takes ~10 s on 2 cores
NOTEBOOK_BUDGET_S = 60    # one notebook, kernel start included; each is written to finish in well under 30 s


def test_tutorial_is_there():
    assert len(NOTEBOOKS) == 9, f"expected the 9 tutorial notebooks in {TUTORIAL}, found {NOTEBOOKS}"
    assert [name[:3] for name in NOTEBOOKS] == [f"{i:02d}_" for i in range(1, 10)], "reading order prefixes 01_..09_"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, monkeypatch):
    if name in NEEDS_TOKENIZER:  # the notebook looks in the same places; this also skips, saying how to get it
        monkeypatch.setenv("MINIMIND_TOKENIZER", tokenizer_folder())
    # The notebooks use tiny models: extra threads only add synchronisation overhead, and on a busy machine
    # oversubscribed threads make small ops many times slower. The kernel inherits this environment.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(os.path.join(TUTORIAL, name), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": TUTORIAL}})
    start = time.perf_counter()
    client.execute()            # raises CellExecutionError, with the failing cell and its traceback
    elapsed = time.perf_counter() - start
    assert elapsed < NOTEBOOK_BUDGET_S, f"{name} took {elapsed:.0f} s, over its {NOTEBOOK_BUDGET_S} s budget"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_clean(name):
    """No outputs in the repository (readable diffs), and the first cell says which part of the model it covers."""
    nb = nbformat.read(os.path.join(TUTORIAL, name), as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{name}: cells {dirty} are stored with outputs; clear them before committing"
    intro = nb.cells[0]
    assert intro.cell_type == "markdown" and re.search(r"\*\*Covers:\*\*.*minimind_o\.py", intro.source), \
        f"{name}: the first cell must say which section of minimind_o.py it covers"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "import minimind_o as mo" in code, f"{name}: notebooks import the model from minimind_o.py"


def test_readmes_link_the_tutorial():
    with open(os.path.join(TUTORIAL, "README.md"), encoding="utf-8") as f:
        tutorial_readme = f.read()
    missing = [name for name in NOTEBOOKS if name not in tutorial_readme]
    assert not missing, f"tutorial/README.md does not list {missing}"
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert "tutorial/" in f.read(), "README.md must link the tutorial"
