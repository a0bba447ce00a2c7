"""The README and docs/*.md point only at what a fresh clone holds: every repository path
they name (in backticks, links or code blocks) is a committed file or folder, every module
they run with `python -m` or name as `jsa_fast.<module>` is one, and none of them sends the
reader to a document outside the repository."""

import fnmatch
import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where a repository path starts: its folders, and the files at its top level. Paths under
# runs/ (what the CLIs write) and placeholders (OUT/, DIR, bench/<name>.py) are not files
# of the repository.
REPO_FOLDERS = ("csrc", "jsa_fast", "bench", "docs", "tests", ".ci")
TOP_LEVEL_FILES = re.compile(
    r"Makefile|setup\.py|pyproject\.toml|requirements[\w-]*\.txt|LICENSE|CITATION\.cff|README\.md|\.gitignore"
)
PLACEHOLDER = re.compile(r"[<>{}]|(^|/)[A-Z][A-Z_]+(/|$)")
# jsa_fast modules that the build makes rather than the repository holds.
BUILT_MODULES = {"jsa_fast._C"}
# The documents that once lived beside the repository (the issue that brought docs/).
OUTSIDE_DOCUMENTS = re.compile(r"\bSPEC\b|\b(?:SPEC|API|ENV)\.md\b")

SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
MODULE = re.compile(r"\bjsa_fast(?:\.\w+)+")
RUN_MODULE = re.compile(r"python -m ([\w.]+)")


def tracked_files() -> set[str]:
    listing = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    assert listing.returncode == 0, f"git ls-files failed in {ROOT}: {listing.stderr.strip()}"
    return set(listing.stdout.splitlines())


TRACKED = tracked_files()
FOLDERS = {str(parent) for path in TRACKED for parent in PurePosixPath(path).parents if str(parent) != "."}
DOCUMENTS = ["README.md", *sorted(p for p in TRACKED if fnmatch.fnmatch(p, "docs/*.md"))]


def mentions(document: str) -> list[str]:
    """The words of a document that may be paths or modules: its backticked spans, its
    link targets (relative to the document's folder) and its fenced code blocks, split
    at white space and stripped of the punctuation around them."""
    text = (ROOT / document).read_text()
    blocks = FENCE.findall(text)
    prose = FENCE.sub("", text)
    words = [word for chunk in [*SPAN.findall(prose), *blocks] for word in chunk.split()]
    folder = PurePosixPath(document).parent
    for target in LINK.findall(prose):
        if not re.match(r"[a-z]+:", target):
            words.append(str(PurePosixPath(folder, target.split("#")[0])))
    return [word.strip(".,;:()[]'\"") for word in words]


def repository_path(word: str) -> str | None:
    """The path a word names in the repository, or None when it names none (a flag, a
    placeholder, a file of another project); test ids and line numbers dropped."""
    path = word.split("::")[0]
    path = re.sub(r":\d+$", "", path)
    if PLACEHOLDER.search(path):
        return None
    if path.split("/")[0] in REPO_FOLDERS or TOP_LEVEL_FILES.fullmatch(path):
        return path.rstrip("/")
    return None


def exists_in_clone(path: str) -> bool:
    if any(c in path for c in "*?["):
        return any(fnmatch.fnmatch(p, path) for p in TRACKED)
    return path in TRACKED or path in FOLDERS


def module_exists(name: str, runnable: bool = False) -> bool:
    """Whether a dotted name starts with a committed jsa_fast module (what follows the
    module may be an attribute: jsa_fast.ops.pack_mask); `runnable`: whether the whole
    name is a module `python -m` can run."""
    parts = name.split(".")
    for length in range(len(parts), 1, -1):
        path = "/".join(parts[:length])
        if runnable:
            return f"{path}.py" in TRACKED or f"{path}/__main__.py" in TRACKED
        if ".".join(parts[:length]) in BUILT_MODULES or f"{path}.py" in TRACKED or f"{path}/__init__.py" in TRACKED:
            return True
    return False


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_repository_path_exists_in_a_fresh_clone(document):
    words = mentions(document)
    paths = sorted({path for word in words if (path := repository_path(word))})
    assert paths, f"{document} names no repository path: the parser is broken"
    missing = [path for path in paths if not exists_in_clone(path)]
    assert not missing, f"{document} names paths that a fresh clone lacks: {missing}"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_named_module_exists(document):
    names = sorted({name for word in mentions(document) for name in MODULE.findall(word)})
    missing = [name for name in names if not module_exists(name)]
    assert not missing, f"{document} names jsa_fast modules that do not exist: {missing}"
    run = sorted(set(RUN_MODULE.findall((ROOT / document).read_text())))
    not_runnable = [name for name in run if name.startswith("jsa_fast") and not module_exists(name, runnable=True)]
    assert not not_runnable, f"{document} runs modules that do not exist: {not_runnable}"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_no_reference_to_documents_outside_the_repository(document):
    lines = (ROOT / document).read_text().splitlines()
    found = [f"line {n}: {line.strip()}" for n, line in enumerate(lines, 1) if OUTSIDE_DOCUMENTS.search(line)]
    assert not found, f"{document} points outside the repository (docs/ holds these now): {found}"


def test_the_checks_catch_what_they_are_for():
    # The parser sees paths in spans, links and code blocks, skips placeholders, and the
    # existence checks reject what is not committed.
    assert repository_path("tests/test_docs.py::test_x") == "tests/test_docs.py"
    assert repository_path("csrc/") == "csrc"
    assert repository_path("Makefile") == "Makefile"
    assert repository_path("bench/<name>.py") is None
    assert repository_path("runs/NAME") is None
    assert repository_path("OUT/last.pt") is None
    assert repository_path("train_slot.py") is None
    assert exists_in_clone("csrc/*.cu") and not exists_in_clone("csrc/*.hip")
    assert exists_in_clone("jsa_fast/kernels") and not exists_in_clone("jsa_fast/kernel")
    assert module_exists("jsa_fast.ops.pack_mask") and module_exists("jsa_fast._C")
    assert module_exists("jsa_fast.kernels.compile_check", runnable=True)
    assert not module_exists("jsa_fast.opz") and not module_exists("jsa_fast.kernels.nothing", runnable=True)
    assert OUTSIDE_DOCUMENTS.search('(SPEC "Losses")') and not OUTSIDE_DOCUMENTS.search("the public API")
