"""Every model file imports only the standard library and torch, and works copied alone."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILES = ["vae.py", "vqvae.py", "vqvae2.py", "ddpm.py", "guided.py", "clip.py", "dalle.py"]
PRESENT = [f for f in MODEL_FILES if (ROOT / f).exists()]


def imported_roots(path):
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                roots.add("." * node.level + (node.module or ""))
            else:
                roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("fname", PRESENT)
def test_imports_only_stdlib_and_torch(fname):
    bad = {r for r in imported_roots(ROOT / fname)
           if r != "torch" and r not in sys.stdlib_module_names}
    assert not bad, f"{fname} imports {sorted(bad)}"


@pytest.mark.parametrize("fname", PRESENT)
def test_imports_when_copied_alone(fname, tmp_path):
    (tmp_path / fname).write_text((ROOT / fname).read_text())
    mod = fname[:-3]
    r = subprocess.run([sys.executable, "-c", f"import {mod}; print(sorted({mod}.PRESETS))"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr
    assert "tiny" in r.stdout


def test_the_import_check_can_fail(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("import numpy\nfrom PIL import Image\nimport torch.nn\n")
    assert imported_roots(p) == {"numpy", "PIL", "torch"}


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme and ci.endswith("python -m pytest -q")
