"""The README and the docs as a user meets them: commands the CLI accepts, pictures that exist, and
text that describes the project as it is (no log of the work on it)."""
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

import sample
import train

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "INTERFACE.md", *sorted((ROOT / "docs").glob("*.md"))]

# How a work log reads: sessions and work periods, dates and hours of runs, commit hashes, what
# was before. The docs state results; the history is in git.
HISTORY = [
    (r"\bsessions?\b", "a work session"),
    (r"\bwork periods?\b", "a work period"),
    (r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth) (period|round|pass)\b",
     "a numbered work period"),
    (r"\b20\d\d-\d\d-\d\d\b", "a date"),
    (r"\b(at|from|past|until) \d{1,2}:\d\d\b", "an hour of the day"),
    (r"\b(morning|evening|afternoon|midnight|tonight|yesterday|today'?s?)\b", "a time of day"),
    (r"\b(earlier|former|previous|old) (run|runs|default|defaults|code|version)\b", "what was before"),
    (r"\b(was|were) reverted\b|\bno longer\b|\bused to be\b", "what changed"),
    (r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", "a commit hash"),
]


CODE_SPAN = r"`[^`]*`"  # file names and commands may hold dates and hashes (pt_inception-2015-12-05-...)


def prose_lines(path):
    """(line number, text) of the lines outside fenced code blocks."""
    inside = False
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            yield i, line


def code_lines(path):
    inside, joined = False, ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if inside:
            joined += line.rstrip()
            if joined.endswith("\\"):
                joined = joined[:-1] + " "
                continue
            yield joined
            joined = ""


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_docs_describe_the_project_not_its_history(path):
    found = [f"{path.name}:{i}: {what}: {m.group(0)!r}"
             for i, line in prose_lines(path) for pattern, what in HISTORY
             for m in [re.search(pattern, re.sub(CODE_SPAN, "", line), re.IGNORECASE)] if m]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_prose_lines_are_at_most_100_characters(path):
    long = [f"{path.name}:{i} ({len(line)} characters)" for i, line in prose_lines(path)
            if len(line) > 100 and not line.lstrip().startswith("|") and "://" not in line]
    assert not long, "\n".join(long)


def test_history_check_can_fail():
    for text in ("measured in the ninth session", "on 2026-11-27", "the run at 21:58",
                 "the former default", "fixed in 1a363d5", "slow that evening"):
        assert any(re.search(p, text, re.IGNORECASE) for p, _ in HISTORY), text


def test_every_readme_image_exists_opens_and_is_small():
    text = (ROOT / "README.md").read_text()
    paths = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(paths) >= 10, paths  # one picture per model that draws
    total = 0
    for p in paths:
        f = ROOT / p
        assert f.is_file(), f"README shows {p}, which does not exist"
        with Image.open(f) as im:
            im.verify()
        size = f.stat().st_size
        assert size < 200_000, f"{p} is {size} bytes; keep each picture under 200 KB"
        total += size
    assert total < 2_000_000


def readme_commands():
    """argv of every `python train.py` / `python sample.py` / torchrun command in the README's
    code blocks (synopsis lines with placeholders are skipped)."""
    out = []
    for line in code_lines(ROOT / "README.md"):
        for part in re.split(r"&&|;", line):
            argv = shlex.split(part, comments=True)
            if not argv or " [" in part or "MODEL" in argv or "RUN_DIR_OR_CKPT" in argv:
                continue
            if argv[0] == "torchrun":
                argv = argv[next(i for i, a in enumerate(argv) if a.endswith(".py")) - 1:]
            if argv[0] == "python" and argv[1] in ("train.py", "sample.py"):
                out.append(argv[1:])
    return out


def test_readme_commands_parse_with_the_project_parsers():
    commands = readme_commands()
    assert sum(c[0] == "train.py" for c in commands) >= 15
    assert sum(c[0] == "sample.py" for c in commands) >= 15
    for argv in commands:
        try:
            if argv[0] == "train.py":
                train.parse_args(argv[1:])
            else:
                p = sample.build_parser()
                p.__class__ = sample.Parser
                p.parse_args(argv[1:])
        except (train.UsageError, SystemExit) as e:
            pytest.fail(f"README command {' '.join(argv)!r} is rejected: {e}")


def test_the_command_check_can_fail():
    with pytest.raises(train.UsageError):
        train.parse_args(["vae", "--no-such-flag", "1"])
    p = sample.build_parser()
    p.__class__ = sample.Parser
    with pytest.raises(train.UsageError):
        p.parse_args(["runs/vae", "--no-such-flag"])
