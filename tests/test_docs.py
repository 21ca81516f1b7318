"""The README and docs/ stay true to the repository.

- Every relative link of README.md and docs/*.md resolves, anchors included.
- Every README code block is ```python or a shell example (```sh, ```bash, ```console); none is indented.
- Python blocks compile; the `lrjax.` names the README's code uses, the `lrjax.x.y` / `module.name`
  names and the repository paths the prose cites exist; docs/design.md places every lrjax module.
- Slow: the README's Python blocks run, in order, in a fresh process.

Why the README's Python only compiles in the fast tests: its examples train on the real Fashion-MNIST
(a one-epoch range test, up to 100 epochs), which needs the data folder and minutes. The slow test
runs them unchanged on the first examples of the real data with epochs capped (~25 s), so an API
change that breaks an example fails there.
"""

import dataclasses
import importlib
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
DATA = ROOT.parent / "shared" / "data" / "fashion_mnist"

SHELL = {"sh", "bash", "console", "shell"}
FENCE = re.compile(r"^(\s*)(```|~~~)\s*([\w+-]*)")
# The same link pattern as the acceptance check `structure` (links inside code count too), plus the anchor.
LINK = re.compile(r"\]\(([^)\s]+)\)")


@dataclasses.dataclass
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang, start = len(m.group(1)), m.group(2), m.group(3).lower(), i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        out.append(Block(lang, "\n".join(body) + "\n", start + 1))
        i += 1
    return out


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks (a fence's own lines count as code)."""
    out, inside, fence = [], False, ""
    for line in text.splitlines():
        m = FENCE.match(line)
        if inside:
            if line.strip().startswith(fence):
                inside = False
            out.append("")
        elif m:
            inside, fence = True, m.group(2)
            out.append("")
        else:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces as hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen, out = {}, set()
    for line in prose(path.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slug_follows_github():
    assert slug("Which suggestion? The matrix") == "which-suggestion-the-matrix"
    assert slug("Optimizers and the range test's rates") == "optimizers-and-the-range-tests-rates"
    assert slug("`lrjax run` by phase") == "lrjax-run-by-phase"
    assert slug("Your own model, loss and metrics") == "your-own-model-loss-and-metrics"


def test_the_block_parser_sees_fences_and_languages():
    text = "a\n```python\nx = 1\n```\n\n  ```sh\n  ls\n  ```\n```\nplain\n```\n"
    assert [(b.lang, b.code, b.line) for b in blocks(text)] == [
        ("python", "x = 1\n", 2), ("sh", "ls\n", 6), ("", "plain\n", 9)]
    assert prose(text) == ["a", "", "", "", "", "", "", "", "", "", ""]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path) if path else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {broken}"


def test_readme_blocks_are_python_or_shell():
    wrong = [f"line {b.line}: ```{b.lang}" for b in blocks(README.read_text()) if b.lang not in SHELL | {"python"}]
    assert not wrong, ("README code blocks must be ```python (compiled here, run by the slow test) or a shell "
                       f"example (```sh, ```bash, ```console): {wrong}")
    # An indented code block has no language to say which it is: the README uses fences only.
    lines = prose(README.read_text())
    indented = [n + 1 for n, line in enumerate(lines)
                if re.match(r"^ {4,}\S", line) and n > 0 and not lines[n - 1].strip()]
    assert not indented, f"README: indented code blocks at lines {indented}; fence them (```sh or ```python)"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_compile(doc):
    for b in blocks(doc.read_text()):
        if b.lang == "python":
            compile(b.code, f"{doc.relative_to(ROOT)}:{b.line}", "exec")


def test_readme_python_names_exist():
    import lrjax
    names = set()
    for b in blocks(README.read_text()):
        if b.lang == "python":
            names |= set(re.findall(r"\blrjax((?:\.[A-Za-z_]\w*)+)", b.code))
    assert names, "the README's Python examples use no lrjax name"
    missing = []
    for chain in sorted(names):
        obj = lrjax
        for part in chain.strip(".").split("."):
            if not hasattr(obj, part):
                try:  # a submodule not re-exported yet (lrjax.callbacks, lrjax.sources, ...)
                    obj = importlib.import_module(f"{obj.__name__}.{part}")
                    continue
                except (ImportError, AttributeError):
                    missing.append(f"lrjax{chain}")
                    break
            obj = getattr(obj, part)
    assert not missing, f"the README uses names lrjax does not have: {missing}"


# Run before the README's blocks: the same calls on the first examples of the real data, with epochs
# capped, in a scratch folder. Nothing else of the examples changes.
PRELUDE = textwrap.dedent("""
    import functools, types, numpy as np, lrjax
    _load = lrjax.load_dataset
    lrjax.load_dataset = lambda name, data_dir=None, **kw: _load(name, DATA_DIR, **kw).take(2048, 256, 256)

    def _capped(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            kwargs["epochs"] = min(kwargs.get("epochs", 2), 2)
            return fn(*args, **kwargs)
        return call
    lrjax.fit, lrjax.sweep = _capped(lrjax.fit), _capped(lrjax.sweep)

    def _regression(rng=np.random.default_rng(0), w=np.linspace(-1, 1, 8, dtype=np.float32)[:, None]):
        # the README's `regression_data`: y = a linear map of x, 8 features
        x = {split: rng.normal(size=(n, 8)).astype(np.float32)
             for split, n in (("train", 256), ("valid", 64), ("test", 64))}
        return types.SimpleNamespace(**{f"x_{k}": v for k, v in x.items()}, **{f"y_{k}": v @ w for k, v in x.items()})
    regression_data = _regression()
""")


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason=f"needs the Fashion-MNIST IDX files in {DATA}")
def test_readme_python_runs(tmp_path):
    code = PRELUDE.replace("DATA_DIR", repr(str(DATA))) + "\n".join(
        b.code for b in blocks(README.read_text()) if b.lang == "python")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LRJAX_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "lr_find.png").exists() and (tmp_path / "sweep.png").exists()
    assert (tmp_path / "runs" / "api" / "checkpoints").is_dir()  # fit(..., workdir="runs/api") checkpointed


def _prose_spans(doc: Path) -> list[str]:
    return re.findall(r"`([^`\n]+)`", "\n".join(prose(doc.read_text())))


MODULES = {p.stem for p in (ROOT / "lrjax").glob("*.py")}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_code_exists(doc):
    """`lrjax.x.y` and `module.name` (an lrjax module) in the prose name something that exists."""
    missing = []
    for span in _prose_spans(doc):
        for mod, rest in re.findall(r"(?<![\w./])(?:lrjax\.)?([a-z_]+)((?:\.[A-Za-z_]\w*)+)", span):
            if mod not in MODULES or rest == ".py":
                continue
            obj = importlib.import_module(f"lrjax.{mod}")
            for part in rest.strip(".").split("."):
                if not hasattr(obj, part):
                    missing.append(f"{mod}{rest}")
                    break
                obj = getattr(obj, part)
    assert not missing, f"{doc.relative_to(ROOT)} names what lrjax does not have: {missing}"


def _expand(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [x for alt in m.group(1).split(",") for x in _expand(pattern[:m.start()] + alt + pattern[m.end():])]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_files_exist(doc):
    """Repository paths in the prose (`tests/...`, `experiments/results/x.{json,txt}`, `steps.py`) exist."""
    missing = []
    for span in _prose_spans(doc):
        if re.match(r"^(tests|experiments|lrjax|docs|\.ci)/\S+$", span):
            if not all(list(ROOT.glob(p)) for p in _expand(span)):
                missing.append(span)
        elif re.match(r"^\w+\.py$", span):
            if not any((ROOT / d / span).exists() for d in ("lrjax", "experiments", "tests", ".")):
                missing.append(span)
    assert not missing, f"{doc.relative_to(ROOT)} names files that do not exist: {missing}"


def test_design_draws_every_module():
    text = (ROOT / "docs" / "design.md").read_text()
    drawn = set(re.findall(r"(?<![/\w])(\w+)\.py\b", text))  # bare module files, not tests/x.py
    assert not MODULES - drawn, (f"docs/design.md does not place {sorted(MODULES - drawn)} in its module drawing: "
                                 "add each to the layer it belongs to")
    assert not drawn - MODULES, f"docs/design.md names modules that no longer exist: {sorted(drawn - MODULES)}"
