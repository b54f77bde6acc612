"""The public API at the package root: each function's docstring example runs, and `import advmend` stays light."""

from __future__ import annotations

import doctest
import subprocess
import sys

import pytest

import advmend


def test_the_root_exports_documented_functions_each_with_an_example():
    for name in advmend.__all__:
        if name == "__version__":
            continue
        doc = getattr(advmend, name).__doc__
        assert doc and "Example:" in doc and ">>> " in doc and "Args:" in doc and "Returns:" in doc, name


def test_import_advmend_does_not_import_torch():
    code = "import sys, advmend; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_advmend_help_does_not_import_torch():
    code = ("import contextlib, io, sys\nfrom advmend.cli import main\ntry:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n        main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.slow
def test_the_docstring_examples_run(tmp_path, monkeypatch):
    """Every example as written (three of them train a one-epoch quickstart on 256 images)."""
    from advmend.data.sources import resolve_root

    if not (resolve_root(None) / "cifar10.npz").is_file():  # the quickstart reads real CIFAR-10
        pytest.skip("CIFAR-10 data not available (set ADVMEND_DATA)")
    monkeypatch.chdir(tmp_path)
    failed, attempted = doctest.testmod(advmend, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert attempted >= 5 and failed == 0
