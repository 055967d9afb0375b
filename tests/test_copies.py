"""STYLE.md rule 3: a block copied from an earlier model file carries `# Copied from mod.Name`
(optionally `with A->B, C->D` renames) directly above it and must equal its source."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^(\s*)# Copied from (\w+)\.([\w.]+)(?: with (.+))?\s*$")


def block_source(path, qualname):
    """Source text of the class/def `qualname` (dotted for methods) in a file, dedented."""
    text = path.read_text()
    node = ast.parse(text)
    for part in qualname.split("."):
        node = next((n for n in ast.iter_child_nodes(node)
                     if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == part), None)
        if node is None:
            return None
    lines = text.splitlines()
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    return _dedent(lines[start:node.end_lineno])


def _dedent(lines):
    indent = min(len(l) - len(l.lstrip()) for l in lines if l.strip())
    return "\n".join(l[indent:].rstrip() for l in lines)


def copies():
    """(file, line, source module, source name, renames, copied text) for every marker."""
    for path in sorted(ROOT.glob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        defs = {n.lineno: n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        for i, line in enumerate(lines):
            m = MARKER.match(line)
            if not m:
                continue
            j = i + 1  # the definition (or its first decorator) must follow directly
            while j < len(lines) and lines[j].strip().startswith("@"):
                j += 1
            node = defs.get(j + 1)
            renames = [tuple(r.split("->")) for r in m.group(4).split(",")] if m.group(4) else []
            text = _dedent(lines[i + 1:node.end_lineno]) if node else None
            yield path.name, i + 1, m.group(2), m.group(3), [(a.strip(), b.strip()) for a, b in renames], text


def test_every_copy_matches_its_source():
    problems, n = [], 0
    for fname, line, mod, name, renames, text in copies():
        n += 1
        where = f"{fname}:{line} (Copied from {mod}.{name})"
        if text is None:
            problems.append(f"{where}: no class or def directly below the marker")
            continue
        src_path = ROOT / f"{mod}.py"
        src = block_source(src_path, name) if src_path.exists() else None
        if src is None:
            problems.append(f"{where}: source not found")
            continue
        for a, b in renames:
            src = src.replace(a, b)
        if src != text:
            problems.append(f"{where}: differs from its source; update the copy or drop the marker")
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_drifted_copy(tmp_path):
    src = "class A:\n    def f(self):\n        return 1\n"
    assert block_source(_write(tmp_path / "m.py", src), "A") != block_source(
        _write(tmp_path / "n.py", src.replace("1", "2")), "A")
    assert block_source(tmp_path / "m.py", "A.f") == "def f(self):\n    return 1"


def _write(p, s):
    p.write_text(s)
    return p
