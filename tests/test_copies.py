"""STYLE.md rule 3: every `# Copied from module.Name[ with A->B, C->D]` block at the repo root is
identical to its source (after the renames). Generic: it checks every marker in every *.py at the
root, so new model files are covered without touching this file."""

import ast
import difflib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^(\s*)# Copied from (\w+)\.([\w.]+)(?: with (.+))?\s*$")


def definitions(source: str) -> dict:
    """Every class and function, by dotted name (`Class.method`), -> (first line, source)."""
    lines = source.splitlines()
    found = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                text = "\n".join(lines[first - 1 : child.end_lineno])
                name = prefix + child.name
                found[name] = (first, text)
                visit(child, name + ".")

    visit(ast.parse(source), "")
    return found


def dedent(text: str) -> str:
    lines = text.splitlines()
    indent = min((len(l) - len(l.lstrip()) for l in lines if l.strip()), default=0)
    return "\n".join(l[indent:] for l in lines)


def check_copies(root: pathlib.Path) -> list:
    """Return (file:line, message) for every marker whose block differs from its source."""
    problems, sources = [], {}
    for path in sorted(root.glob("*.py")):
        text = path.read_text()
        defs_by_line = {first: body for first, body in definitions(text).values()}
        lines = text.splitlines()
        for i, line in enumerate(lines):
            m = MARKER.match(line)
            if not m:
                continue
            where = f"{path.name}:{i + 1}"
            module, name, renames = m.group(2), m.group(3), m.group(4)
            copy = defs_by_line.get(i + 2)  # the definition must start on the next line
            if copy is None:
                problems.append((where, "no class or def directly below the marker"))
                continue
            src_path = root / f"{module}.py"
            if not src_path.exists():
                problems.append((where, f"source file {module}.py not found"))
                continue
            if module not in sources:
                sources[module] = {k: v[1] for k, v in definitions(src_path.read_text()).items()}
            if name not in sources[module]:
                problems.append((where, f"{module}.{name} not found"))
                continue
            expect = sources[module][name]
            for pair in (renames or "").split(","):
                if pair.strip():
                    a, b = (s.strip() for s in pair.split("->"))
                    expect = expect.replace(a, b)
            if dedent(expect) != dedent(copy):
                diff = "\n".join(difflib.unified_diff(
                    dedent(expect).splitlines(), dedent(copy).splitlines(),
                    f"{module}.{name}", where, lineterm=""))
                problems.append((where, f"differs from {module}.{name}:\n{diff}"))
    return problems


def test_copies_match_their_sources():
    problems = check_copies(ROOT)
    assert not problems, "\n\n".join(f"{w}: {msg}" for w, msg in problems)


def test_the_check_catches_drift(tmp_path):
    (tmp_path / "a.py").write_text("def f(x):\n    return x + 1\n\n\nclass Foo:\n    pass\n")
    ok = "# Copied from a.f\ndef f(x):\n    return x + 1\n\n\n# Copied from a.Foo with Foo->Bar\nclass Bar:\n    pass\n"
    (tmp_path / "b.py").write_text(ok)
    assert check_copies(tmp_path) == []
    (tmp_path / "b.py").write_text(ok.replace("x + 1", "x + 2"))
    problems = check_copies(tmp_path)
    assert len(problems) == 1 and problems[0][0] == "b.py:1"
    (tmp_path / "b.py").write_text("# Copied from a.g\ndef g():\n    pass\n")
    assert "not found" in check_copies(tmp_path)[0][1]


def test_markers_exist():
    """At least the quantiser and the PixelCNN layer of vqvae.py are checked copies in vqvae2.py."""
    text = (ROOT / "vqvae2.py").read_text()
    for name in ("VectorQuantizer", "GatedLayer", "ResBlock"):
        assert f"# Copied from vqvae.{name}\n" in text
