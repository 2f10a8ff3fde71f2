"""The documentation stays true to the code: every name, file, flag and link that README.md and docs/*.md cite
exists, and the README's library example runs as written.

What counts as a citation (so that a doc writer knows what is checked):
  - a file: a backticked path ending in .py, .sh or .md (`bench/adaptive.py`); `tests/x.py::test_y` also names a
    test function in it. Relative links, and their #anchors, must resolve (in bench/*.md too);
  - a name in a file: "`file.py`: `a`, `B.c`" (a list of backticked names right after the file, separated by
    commas, slashes or "and"), or "`file.py: a, B.c`" in one span. A bare name must be unambiguous: a method's
    name that is also a module-level function is written `Class.method` or `module.function`;
  - a module attribute: a backticked `module.name` or `module.Class.attr` whose first part is one of the
    project's modules (the .py files at the root, and the kernels package);
  - a flag: every `--flag` of a command (in a code block, or in one backticked span `script.py --flag`) must be an
    option of that script's parser (torchrun's before the script, of torchrun's); a backticked `--flag` standing
    alone must be an option of one of the project's scripts or of torchrun.
Table cells under a header naming the authors' logs or released code are not checked: they cite the authors'
files and flags. A file of another project is cited by a link to it, not in backticks.
Parsers are read without running a script's job: each script is run as __main__, in one separate process, with
parsing stopped at its first parse_args call. Names are read with ast, without importing the modules.
"""
import ast
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*DOCS, *sorted((ROOT / "bench").glob("*.md"))]  # where links and anchors are checked
FILE_EXTENSIONS = ("py", "sh", "md", "json", "tsv", "pt", "png", "log", "txt", "yaml", "tmp")
IDENTIFIER = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"


# ----------------------------------------------------------------------------------------------------
# Reading the docs

def spans(text: str) -> list[str]:
    """Backticked inline spans outside fenced code blocks (a span may wrap onto the next line)."""
    return [" ".join(m.split()) for m in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))]


def blocks(text: str) -> list[str]:
    """Paragraphs and table rows outside code blocks: the scope in which a standalone flag finds its script."""
    out = []
    for para in re.split(r"\n\s*\n", re.sub(r"```.*?```", "", text, flags=re.S)):
        rows = [line for line in para.splitlines() if line.lstrip().startswith("|")]
        out += rows if rows else [para]
    return out


def code_blocks(text: str, language: str | None = None) -> list[str]:
    return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)
            if language is None or lang == language]


def doc_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def without_authors_columns(text: str) -> str:
    """The text with the table cells under a header naming the authors' logs or released code emptied: those cite
    the authors' files and flags, not ours."""
    lines, header = text.splitlines(), None
    for k, line in enumerate(lines):
        if not line.lstrip().startswith("|"):
            header = None
            continue
        cells = line.strip().strip("|").split("|")
        if header is None:
            header = [bool(re.search(r"released|authors", c, re.I)) for c in cells]
        elif len(cells) == len(header):
            lines[k] = "|" + "|".join("" if theirs else c for c, theirs in zip(cells, header)) + "|"
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Reading the code

@functools.cache
def definitions(path: Path) -> dict[str, set[str]]:
    """Names a file defines: "" -> its module-level names; "Class" -> the class's attributes (defs, assignments in
    its body, self.x assignments in its methods). Imported names count only in a package's __init__.py."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: dict[str, set[str]] = {"": set()}

    def targets(node) -> list[str]:
        found = []
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
            found += [n.id for n in ast.walk(t) if isinstance(n, ast.Name)]
        return found

    def module_level(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names[""].add(node.name)
            elif isinstance(node, ast.ClassDef):
                names[""].add(node.name)
                members = names.setdefault(node.name, set())
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        members.add(item.name)
                    elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                        members.update(targets(item))
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) and \
                            isinstance(sub.value, ast.Name) and sub.value.id == "self":
                        members.add(sub.attr)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                names[""].update(targets(node))
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and path.name == "__init__.py":
                names[""].update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, []):
                        module_level(child.body if isinstance(child, ast.ExceptHandler) else [child])
    module_level(tree.body)
    return names


def project_modules() -> dict[str, Path]:
    modules = {p.stem: p for p in ROOT.glob("*.py")}
    modules["kernels"] = ROOT / "kernels" / "__init__.py"
    return modules


def resolve(path: Path, dotted: str) -> str | None:
    """None if `dotted` (name, Class.attr, or a kernels submodule's name) is defined in path; else why not."""
    parts = dotted.split(".")
    if path.name == "__init__.py" and (path.parent / f"{parts[0]}.py").exists() and len(parts) > 1:
        return resolve(path.parent / f"{parts[0]}.py", ".".join(parts[1:]))
    names = definitions(path)
    if parts[0] not in names[""]:
        return f"{path.relative_to(ROOT)} defines no {parts[0]}"
    if len(parts) == 2 and parts[1] not in names.get(parts[0], set()):
        return f"{path.relative_to(ROOT)}: {parts[0]} has no {parts[1]}"
    if len(parts) > 2:
        return f"{dotted}: names nested deeper than Class.attr are not checked; cite the class's attribute"
    return None


def ambiguous(path: Path, name: str) -> bool:
    """A bare name that is both a module-level function and some class's method in the file."""
    names = definitions(path)
    return "." not in name and name in names[""] and any(name in members for cls, members in names.items() if cls)


# ----------------------------------------------------------------------------------------------------
# Citations

def cited_files(text: str) -> set[str]:
    return {s.split("::")[0] for s in spans(text) if re.fullmatch(r"[\w./-]+\.(py|sh|md)(::\w+)?", s)}


def name_citations(text: str) -> list[tuple[str, str]]:
    """(file, name) pairs: "`file.py`: `a`, `b`", "`file.py: a, b`" and "`tests/x.py::test_y`"."""
    out = []
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    name_list = rf"`({IDENTIFIER})`((?:\s*(?:,|/|and)\s*`{IDENTIFIER}`)*)"
    for m in re.finditer(rf"`([\w/]+\.py)`:\s*{name_list}", prose):
        out += [(m[1], n) for n in [m[2], *re.findall(r"`([^`]+)`", m[3])]]
    for s in spans(text):
        if m := re.fullmatch(rf"([\w/]+\.py): ({IDENTIFIER}(?:, {IDENTIFIER})*)", s):
            out += [(m[1], n) for n in m[2].split(", ")]
        elif m := re.fullmatch(r"([\w/]+\.py)::(\w+)", s):
            out.append((m[1], m[2]))
    return out


def module_citations(text: str) -> list[str]:
    modules = project_modules()
    return [s for s in spans(text) if re.fullmatch(IDENTIFIER, s) and "." in s and s.split(".")[0] in modules
            and s.split(".")[-1] not in FILE_EXTENSIONS]


# Run in a process of its own: a script may change its process as it starts (bench/compile_report.py unsets
# TRITON_INTERPRET before triton is imported), which must not reach the tests that run after this one.
READ_PARSERS = r"""
import argparse, json, runpy, sys
from torch.distributed.run import get_args_parser

class Parsed(Exception):
    pass

def stop(parser, *args, **kwargs):
    raise Parsed(parser)

found = {"torchrun": [o for a in get_args_parser()._actions for o in a.option_strings]}
argparse.ArgumentParser.parse_known_args = stop
for path in sys.argv[1:]:
    sys.argv, sys.path[:0] = [path, "--help"], [path.rsplit("/", 1)[0]]
    try:
        runpy.run_path(path, run_name="__main__")
    except Parsed as parsed:
        found[path] = [o for a in parsed.args[0]._actions for o in a.option_strings]
print(json.dumps(found))
"""


@functools.cache
def parsers() -> dict[str, frozenset[str]]:
    """Each script's option strings (and torchrun's), read by running the script as __main__ with `--help` up to
    its first parse_args call, where it stops: none of them starts its job."""
    scripts = all_scripts()
    done = subprocess.run([sys.executable, "-c", READ_PARSERS, *(str(ROOT / s) for s in scripts)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.splitlines()[-1])
    missing = [s for s in scripts if str(ROOT / s) not in found]
    assert not missing, f"{missing} ran to the end without parsing their flags"
    return {"torchrun": frozenset(found["torchrun"])} | {s: frozenset(found[str(ROOT / s)]) for s in scripts}


def options(script: str) -> frozenset[str]:
    return parsers()[script]


def flag(token: str) -> str | None:
    m = re.match(r"(--[a-z][\w-]*)", token)
    return m[1] if m else None


def command_flags(command: str) -> list[tuple[str, str]]:
    """(script, flag) for every flag of every command in a shell line: `python x.py --a`, `torchrun --b -- x.py --a`."""
    out = []
    for part in re.split(r"&&|\|\||;|\||\bdo\b", command.split(" #")[0]):
        words = part.split()
        where = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
        if where is None:
            continue
        script = words[where]
        if not (ROOT / script).exists():
            continue
        before = words[:where]
        if any(w in ("torchrun", "torch.distributed.run") for w in before):
            out += [("torchrun", f) for w in before if (f := flag(w))]
        out += [(script, f) for w in words[where + 1:] if (f := flag(w))]
    return out


def flag_citations(text: str) -> list[tuple[tuple[str, ...], str, str]]:
    """(scripts any of which must have the flag, the flag, where it was cited)."""
    out = []
    for body in code_blocks(text):
        for line in body.replace("\\\n", " ").splitlines():
            out += [((script,), f, line.strip()) for script, f in command_flags(line)]
    for block in blocks(text):
        for s in spans(block):
            if re.search(r"\.py\b", s):
                out += [((script,), f, s) for script, f in command_flags(s)]
            elif flag(s):
                out += [(tuple(all_scripts()) + ("torchrun",), f, s) for w in s.split() if (f := flag(w))]
    return out


def all_scripts() -> list[str]:
    return [s for s in ["pretrain.py", "finetune.py", "certify.py", "report.py", "linear_probe.py",
                        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*.py"))]
            if "parse_args" in (ROOT / s).read_text(encoding="utf-8")]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation (backticks included) dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", doc_text(path), flags=re.S), flags=re.M):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


# ----------------------------------------------------------------------------------------------------
# The checks

def problems_in(text: str, where: str, folder: Path) -> list[str]:
    """Everything a doc (its text, its name, its folder) cites that the code or the tree does not have, one line each."""
    problems, text = [], without_authors_columns(text)
    for f in sorted(cited_files(text)):
        if not (ROOT / f).exists() and not (folder / f).exists():
            problems.append(f"{where}: cites {f}, which does not exist")
    for file, name in name_citations(text):
        target = ROOT / file
        if not target.exists():
            problems.append(f"{where}: cites {file}: {name}, but there is no {file}")
        elif why := resolve(target, name):
            problems.append(f"{where}: cites {file}: {name}, but {why}")
        elif ambiguous(target, name):
            problems.append(f"{where}: cites {file}: {name}, which is both a function and a method there: write "
                            f"Class.{name} or {target.stem}.{name}")
    modules = project_modules()
    for dotted in module_citations(text):
        module, _, rest = dotted.partition(".")
        if why := resolve(modules[module], rest):
            problems.append(f"{where}: cites {dotted}, but {why}")
    for candidates, f, context in flag_citations(text):
        if not any(f in options(s) for s in candidates):
            problems.append(f"{where}: {f} is not an option of {' or '.join(candidates)} (cited in: {context})")
    return problems


def link_problems(path: Path) -> list[str]:
    """Relative links whose file or #anchor does not exist."""
    problems = []
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", doc_text(path)):
        if re.match(r"\w+:", target):
            continue
        file = (path.parent / target) if target else path
        if not file.exists():
            problems.append(f"{path.relative_to(ROOT)}: links to {target}, which does not exist")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(f"{path.relative_to(ROOT)}: links to {target}#{anchor}, which has no such heading")
    return problems


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_what_the_docs_cite_exists(path):
    assert problems_in(doc_text(path), str(path.relative_to(ROOT)), path.parent) == []


@pytest.mark.quick
@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(path):
    assert link_problems(path) == []


@pytest.mark.quick
def test_the_reading_order_names_every_module():
    """Each of the project's modules at the root is named in the README's reading-order table."""
    readme = doc_text(ROOT / "README.md")
    table = readme[readme.index("## Reading order"):]
    table = table[:table.index("\n## ")]
    assert sorted(p.name for p in ROOT.glob("*.py") if f"`{p.name}`" not in table) == []


@pytest.mark.quick
def test_the_readme_library_example_runs_as_written():
    """The "Certifying any classifier" snippet as written but for n (1,000 for the README's 100,000, to keep it
    cheap), statement by statement, on a linear classifier that always prefers class 3: every noisy sample votes 3,
    so CERTIFY's bound is Clopper-Pearson's with k = n, alpha^(1/n), and its radius sigma Phi^-1(alpha^(1/n))
    (computed here in closed form, not by smoothing.py): 0.616 at sigma 0.25. Adaptive CERTIFY certifies the largest
    reported radius within that reach (0.5) before n and stops there. fp32, any CPU."""
    import torch
    from scipy.special import ndtri  # Phi^-1, not the NormalDist smoothing.py uses
    readme = doc_text(ROOT / "README.md")
    snippet = code_blocks(readme[readme.index("## Certifying any classifier"):], "python")[0]
    assert snippet.count("n=100_000") == 2, "the README's example changed: update this test's n"
    n, alpha, sigma = 1_000, 0.001, 0.25
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
    with torch.no_grad():
        classifier[1].weight.zero_()
        classifier[1].bias.copy_((torch.arange(10) == 3).float())
    scope, results = {"classifier": classifier, "x": torch.rand(3, 2, 2), "i": 7}, {}
    for statement in ast.parse(snippet.replace("n=100_000", f"n={n}")).body:
        exec(compile(ast.Module([statement], []), "README.md", "exec"), scope)
        call = ast.unparse(statement)
        for method in ("certify_adaptive", "certify"):
            if f".{method}(" in call:
                results[method] = scope["prediction"], scope["radius"]
                break
    expected = sigma * ndtri(alpha ** (1 / n))
    prediction, radius = results["certify"]
    assert prediction == 3 and expected - 1e-4 <= radius <= expected
    prediction, radius = results["certify_adaptive"]
    assert prediction == 3 and 0.5 <= radius < expected and scope["samples"] < n


def test_the_checks_catch_stale_names():
    """The checks fail on what they must: a renamed class, a function moved to another module, an ambiguous bare
    name (the reading order's three faults at 5e78e48), a flag a script does not have, inline and in a command;
    and pass what they must: the authors' flags in the released-code column, a method named by its class."""
    text = ("| Eq. 11 | `pretrain.py`: `project`, `Objective` | lr `jobs.warmup_cosine` |\n\n"
            "| adaptive | `smoothing.py`: `certify_adaptive`, `AdaptivePlan` | `smoothing.py`: `Smooth.certify_adaptive` |\n\n"
            "Run `certify.py --no-such-flag` or `python report.py out/x.tsv --envelope`; `--adaptive` stops early.\n\n"
            "| point | released code | this project |\n|---|---|---|\n| grid | `certify.py --sigmas` | `--sigma` |\n\n"
            "```bash\ntorchrun --nproc_per_node=2 -- finetune.py --sigma 0.5 --eta3 1   # a comment --not-a-flag\n```\n")
    assert problems_in(text, "stale.md", ROOT) == [
        "stale.md: cites pretrain.py: Objective, but pretrain.py defines no Objective",
        "stale.md: cites smoothing.py: certify_adaptive, which is both a function and a method there: write "
        "Class.certify_adaptive or smoothing.certify_adaptive",
        "stale.md: cites jobs.warmup_cosine, but jobs.py defines no warmup_cosine",
        "stale.md: --eta3 is not an option of finetune.py (cited in: torchrun --nproc_per_node=2 -- finetune.py "
        "--sigma 0.5 --eta3 1   # a comment --not-a-flag)",
        "stale.md: --no-such-flag is not an option of certify.py (cited in: certify.py --no-such-flag)",
    ]
