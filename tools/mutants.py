"""Mutation testing of the evaluator, the map making and the losses (issue #24).

Each target file is parsed with `ast`; every single-point mutation of its code (in the
listed functions only, for jsa_fast/reference.py) is written into a temporary copy of
the package, and the target's own test files run against that copy (`pytest -x -q`,
with a timeout). A mutant is killed when a test fails (or errors, or the process
crashes), survives when all pass, times out past the limit. The real files are never
written: every worker has its own copy of jsa_fast/ (the built extension included) in
a temporary folder, first on sys.path of the test process.

Mutations (one at a time): comparison operators (< <= > >=, == !=, is / is not,
in / not in), arithmetic (+ -, * /, // %, **), and/or, True/False, an int n -> n + 1,
a float f -> 2 f (0.0 -> 1.0), a unary -, not or ~ removed, min <-> max (built-in and
tensor methods, amin <-> amax), a dim=/axis= index replaced (0 -> 1, else -> 0), and a
no-argument .mean() / .sum() / .relu() / .detach() call dropped. Docstrings, strings,
f-strings (error messages), annotations, imports and __all__ are left alone.

Equivalent mutants (no input can tell them from the original) are listed by hand in
EQUIVALENT with the reason; they are left out of the score (and not run, unless
--check-equivalent, which reports any of them that a test kills).

Speed: a process that has already imported the test modules' third-party dependencies
(torch, numpy, pytest, triton, ...) forks one child per mutant, which imports jsa_fast
from its copy and runs pytest in-process: about 1 s per mutant instead of 7 s for a
fresh interpreter.

    .venv/bin/python tools/mutants.py                     # all targets (make mutants)
    .venv/bin/python tools/mutants.py --files jsa_fast/maps.py --limit 20
    .venv/bin/python tools/mutants.py --list              # the mutants, nothing run

Prints a table per file (mutants, killed, survived, timeout, equivalent, score =
killed / (mutants - equivalent)) and the surviving mutants, and writes all of it to
bench/results/mutants-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import datetime as dt
import importlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "jsa_fast"
RESULTS = ROOT / "bench" / "results"


@dataclasses.dataclass(frozen=True)
class Target:
    """A file to mutate, the tests that judge its mutants, and (optionally) the only
    top-level functions whose code is mutated and a pytest -k expression."""

    tests: tuple[str, ...]
    functions: tuple[str, ...] | None = None
    keyword: str | None = None


TARGETS = {
    "jsa_fast/metrics.py": Target(tests=("tests/test_metrics.py",)),
    "jsa_fast/maps.py": Target(tests=("tests/test_maps.py",)),
    "jsa_fast/losses.py": Target(tests=("tests/test_losses.py",)),
    # The losses and the k-reciprocal mask of the reference. test_reference.py's tests of
    # the JointSlotAttention module (10+ s, none of them calls these functions) are left
    # out by -k: the tests kept are all of test_losses.py (its module name holds "loss")
    # and those of test_reference.py named after what is mutated.
    "jsa_fast/reference.py": Target(
        tests=("tests/test_losses.py", "tests/test_reference.py"),
        functions=(
            "check_k_reciprocal_inputs",
            "_k_nearest",
            "mutual_neighbour_mask",
            "k_reciprocal_mask",
            "info_nce_loss",
            "match_loss",
            "_slot_divergence",
            "divergence_loss",
            "reconstruction_loss",
        ),
        keyword="loss or k_reciprocal or neighbour or nearest",
    ),
}


# Equivalent mutants, found by hand among the survivors: (file, "line" or "line:col" where
# the line holds two alike, original, mutated, why no input tells them apart). `original`
# and `mutated` are the mutated node as ast.unparse writes it (what the report shows).
EQUIVALENT: list[tuple[str, str, str, str, str]] = [
    (
        "jsa_fast/metrics.py", "48", "torch.as_tensor(x).detach()", "torch.as_tensor(x)",
        "_as_float without detach: every evaluator reads its inputs only through ops whose "
        "results it turns into Python numbers (.item(), .tolist()) or int tensors (sort "
        "indices, searchsorted counts, comparisons) before numpy; none of them refuses a "
        "tensor that requires grad and none writes in place, so the graph it builds is "
        "dropped and every value is the same",
    ),
    (
        "jsa_fast/metrics.py", "239", "-1.0", "-2.0",
        "the mask's background pixels are moved below every threshold to count true "
        "positives; the thresholds are >= 0 and pred is checked to be >= 0, so -1 and -2 "
        "are below all of them alike (searchsorted counts the same)",
    ),
    (
        "jsa_fast/metrics.py", "241", "predicted + 1e-20", "predicted - 1e-20",
        "predicted is an integer count (exact in float32 up to 2^24 and rounded alike "
        "above): n +- 1e-20 rounds to n for n >= 1; for n = 0 true_pos is 0 too and 0 / "
        "(+-1e-20) = +-0, whose F is 0 either way (denom = 0.3 * (+-0) + 0 is not > 0)",
    ),
    (
        "jsa_fast/metrics.py", "241", "1e-20", "2e-20",
        "as predicted - 1e-20: for a count n >= 1, n + 2e-20 rounds to n; for n = 0 "
        "the precision is 0 / 2e-20 = 0 as 0 / 1e-20",
    ),
    (
        "jsa_fast/metrics.py", "242", "g.sum(1, keepdim=True) + 1e-20", "g.sum(1, keepdim=True) - 1e-20",
        "the recall's denominator is the mask's pixel count: >= 1 in every sample whose F "
        "is kept (fscore[~empty]), where +- 1e-20 rounds away; empty masks' rows are "
        "dropped whatever they hold",
    ),
    (
        "jsa_fast/metrics.py", "242", "1e-20", "2e-20",
        "as the line's other mutant: counts >= 1 absorb 2e-20, rows of empty masks are dropped",
    ),
    (
        "jsa_fast/reference.py", "306", "True", "False",
        "zip(..., strict=False) over three sequences of length 2 built on the lines above "
        "(two literal tuples and the two flags of a two-element stack): the lengths always "
        "agree, so strict never raises",
    ),
    (
        "jsa_fast/reference.py", "376:36", "-1", "1",
        "F.normalize(p_img, dim=1) for dim=-1: info_nce_loss's inputs are B x d (its "
        "logits, .T and cross_entropy with B labels need 2-D rows), where dim 1 is dim -1; "
        "any other rank raises in both versions",
    ),
    (
        "jsa_fast/reference.py", "376:65", "-1", "1",
        "as 376:36, for p_aud",
    ),
]  # fmt: skip


# ----------------------------------------------------------------------------------
# Mutants
# ----------------------------------------------------------------------------------

COMPARE_SWAPS: dict[type, tuple[type, ...]] = {
    ast.Lt: (ast.LtE, ast.Gt),
    ast.LtE: (ast.Lt, ast.GtE),
    ast.Gt: (ast.GtE, ast.Lt),
    ast.GtE: (ast.Gt, ast.LtE),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
    ast.Is: (ast.IsNot,),
    ast.IsNot: (ast.Is,),
    ast.In: (ast.NotIn,),
    ast.NotIn: (ast.In,),
}
BINOP_SWAPS: dict[type, tuple[type, ...]] = {
    ast.Add: (ast.Sub,),
    ast.Sub: (ast.Add,),
    ast.Mult: (ast.Div,),
    ast.Div: (ast.Mult,),
    ast.FloorDiv: (ast.Mod,),
    ast.Mod: (ast.FloorDiv,),
    ast.Pow: (ast.Mult,),
    ast.BitAnd: (ast.BitOr,),
    ast.BitOr: (ast.BitAnd,),
}
NAME_SWAPS = {"min": "max", "max": "min", "amin": "amax", "amax": "amin", "minimum": "maximum", "maximum": "minimum"}
DROPPED_METHODS = {"mean", "sum", "relu", "detach"}
DIM_KEYWORDS = {"dim", "axis"}


@dataclasses.dataclass
class Mutant:
    file: str
    line: int
    col: int
    scope: str
    operator: str
    original: str
    mutated: str
    source: str = dataclasses.field(repr=False, default="")
    status: str = "pending"  # killed / survived / timeout / equivalent / error
    seconds: float = 0.0
    killed_by: str = ""
    reason: str = ""

    def describe(self) -> str:
        return (
            f"{self.file}:{self.line}:{self.col} ({self.scope}) [{self.operator}] `{self.original}` -> `{self.mutated}`"
        )

    def record(self) -> dict:
        record = dataclasses.asdict(self)
        del record["source"]
        return record


def _number(node: ast.expr) -> int | float | None:
    """The value of an int or float literal, -n included (not a bool)."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _number(node.operand)
        return None if inner is None else -inner
    return None


def _int_value(node: ast.expr) -> int | None:
    value = _number(node)
    return value if type(value) is int else None


def _literal(value: int | float) -> ast.expr:
    return ast.Constant(value) if value >= 0 else ast.UnaryOp(ast.USub(), ast.Constant(-value))


def _number_mutation(value: int | float) -> tuple[str, ast.expr]:
    """int n -> n + 1; float f -> 2 f (0.0 -> 1.0)."""
    if type(value) is int:
        return "int", _literal(value + 1)
    return "float", _literal(2 * value if value != 0 else 1.0)


def node_mutations(node: ast.AST) -> list[tuple[str, ast.expr]]:
    """(operator name, replacement node) for each single-point mutation of `node` itself."""
    out: list[tuple[str, ast.expr]] = []
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            for swap in COMPARE_SWAPS.get(type(op), ()):
                new = copy.deepcopy(node)
                new.ops[i] = swap()
                out.append(("compare", new))
    elif isinstance(node, ast.BinOp) and not isinstance(node.op, ast.MatMult):
        for swap in BINOP_SWAPS.get(type(node.op), ()):
            new = copy.deepcopy(node)
            new.op = swap()
            out.append(("arithmetic", new))
    elif isinstance(node, ast.BoolOp):
        new = copy.deepcopy(node)
        new.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        out.append(("and/or", new))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not, ast.Invert)):
        out.append(("unary removed", copy.deepcopy(node.operand)))
        number = _number(node)
        if number is not None:  # a negative literal is one number: -1 -> 0, -1.0 -> -2.0
            out.append(_number_mutation(number))
    elif isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool):
            out.append(("bool", ast.Constant(not value)))
        elif isinstance(value, int | float):
            out.append(_number_mutation(value))
    elif isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and func.id in NAME_SWAPS:
            new = copy.deepcopy(node)
            new.func.id = NAME_SWAPS[func.id]
            out.append(("min/max", new))
        elif isinstance(func, ast.Attribute) and func.attr in NAME_SWAPS:
            new = copy.deepcopy(node)
            new.func.attr = NAME_SWAPS[func.attr]
            out.append(("min/max", new))
        if isinstance(func, ast.Attribute) and func.attr in DROPPED_METHODS and not node.args and not node.keywords:
            out.append(("call dropped", copy.deepcopy(func.value)))
        for i, keyword in enumerate(node.keywords):
            value = _int_value(keyword.value)
            if keyword.arg in DIM_KEYWORDS and value is not None:
                new = copy.deepcopy(node)
                new.keywords[i].value = ast.Constant(1 if value == 0 else 0)
                out.append(("dim", new))
    return out


class _Collector(ast.NodeVisitor):
    """Walks the code to mutate, skipping docstrings, strings, annotations and imports."""

    def __init__(self, functions: tuple[str, ...] | None) -> None:
        self.functions = functions
        self.scope: list[str] = []
        self.found: list[tuple[ast.AST, str]] = []

    def _active(self) -> bool:
        return self.functions is None or (bool(self.scope) and self.scope[0] in self.functions)

    def _body(self, body: list[ast.stmt]) -> None:
        for i, stmt in enumerate(body):
            is_docstring = (
                i == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
                and isinstance(stmt.value.value, str)
            )  # fmt: skip
            if not is_docstring:
                self.visit(stmt)

    def visit_Module(self, node: ast.Module) -> None:
        self._body(node.body)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.scope.append(node.name)
        for default in [*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)]:
            self.visit(default)
        for decorator in node.decorator_list:
            self.visit(decorator)
        self._body(node.body)
        self.scope.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        for decorator in node.decorator_list:
            self.visit(decorator)
        self._body(node.body)
        self.scope.pop()

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)

    def visit_Assign(self, node: ast.Assign) -> None:
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return
        self.visit(node.value)  # targets are stores: nothing to mutate there

    def visit_Import(self, node: ast.Import) -> None:
        pass

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        pass

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        pass

    def generic_visit(self, node: ast.AST) -> None:
        if self._active() and isinstance(node, ast.expr):
            self.found.append((node, ".".join(self.scope) or "<module>"))
        if isinstance(node, ast.UnaryOp) and _number(node) is not None:
            return  # -n is mutated as one number, not its n
        super().generic_visit(node)


def _line_offsets(data: bytes) -> list[int]:
    offsets, position = [0], 0
    for line in data.splitlines(keepends=True):
        position += len(line)
        offsets.append(position)
    return offsets


def generate_mutants(file: str, target: Target) -> list[Mutant]:
    """Every single-point mutant of `file` (relative to ROOT), in source order."""
    text = (ROOT / file).read_text()
    data = text.encode()
    offsets = _line_offsets(data)
    collector = _Collector(target.functions)
    collector.visit(ast.parse(text))
    if target.functions is not None:
        defined = {n.name for n in ast.parse(text).body if isinstance(n, ast.FunctionDef)}
        missing = set(target.functions) - defined
        if missing:
            raise SystemExit(f"{file}: no top-level function named {sorted(missing)}")
    mutants, seen = [], {text}
    for node, scope in collector.found:
        start = offsets[node.lineno - 1] + node.col_offset  # col offsets count UTF-8 bytes
        end = offsets[node.end_lineno - 1] + node.end_col_offset
        for operator, replacement in node_mutations(node):
            mutated_text = ast.unparse(replacement)
            source = (data[:start] + f"({mutated_text})".encode() + data[end:]).decode()
            if source in seen:
                continue
            seen.add(source)
            try:
                compile(source, file, "exec")
            except SyntaxError:
                continue
            mutants.append(
                Mutant(file, node.lineno, node.col_offset, scope, operator, ast.unparse(node), mutated_text, source)
            )
    return mutants


def mark_equivalent(mutants: list[Mutant], file: str) -> list[str]:
    """Mark the mutants of `file` listed in EQUIVALENT; returns the entries that match no
    mutant, or more than one (a location without its column that is ambiguous)."""
    problems = []
    for entry_file, location, original, mutated, reason in EQUIVALENT:
        if entry_file != file:
            continue
        line, _, col = location.partition(":")
        hits = [
            m for m in mutants
            if (m.line, m.original, m.mutated) == (int(line), original, mutated) and (not col or m.col == int(col))
        ]  # fmt: skip
        for m in hits:
            m.status, m.reason = "equivalent", reason
        if len(hits) != 1:
            problems.append(f"{file}:{location} `{original}` -> `{mutated}` matches {len(hits)} mutants")
    return problems


# ----------------------------------------------------------------------------------
# Running the tests
# ----------------------------------------------------------------------------------


def preload_dependencies(test_files: list[str]) -> int:
    """Import into this process what the test modules import from outside the project
    (found by a pytest --collect-only in a child interpreter), so that every forked
    child starts with them loaded. Returns how many modules were imported."""
    probe = (
        "import os, sys, pytest\n"
        "rc = pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', *sys.argv[2:]])\n"
        "own = (os.path.join(sys.argv[1], 'jsa_fast'), os.path.join(sys.argv[1], 'tests'))\n"
        "names = [n for n, m in list(sys.modules.items())\n"
        "         if not n.startswith(('jsa_fast', '__main__', 'conftest', 'test_'))\n"
        "         and not str(getattr(m, '__file__', None) or '').startswith(own)]\n"
        "print('\\nPRELOAD ' + ' '.join(names) if rc == 0 else '\\nPRELOAD-FAILED')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(ROOT), *test_files], cwd=ROOT, capture_output=True, text=True, check=False
    )
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("PRELOAD")), "PRELOAD-FAILED")
    if line == "PRELOAD-FAILED":
        raise SystemExit(f"collecting the tests failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    count = 0
    for name in line.split()[1:]:
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
            count += 1
        except Exception:  # noqa: BLE001 (a module that imports only in its package's context)
            pass
    return count


class Worker:
    """A temporary copy of the package (its tree with the built extension, no caches)."""

    def __init__(self, base: Path, index: int) -> None:
        self.dir = base / f"worker{index}"
        shutil.copytree(ROOT / PACKAGE, self.dir / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
        self.log = self.dir / "pytest.log"

    def write(self, file: str, source: str) -> None:
        (self.dir / file).write_text(source)

    def restore(self, file: str) -> None:
        shutil.copyfile(ROOT / file, self.dir / file)


def _child(worker: Worker, file: str, tests: list[str], keyword: str | None, threads: int) -> None:
    """In the forked child: run pytest on `tests` against the worker's package; exit with
    pytest's code, or 97 when jsa_fast (or the mutated module) was not the copy's."""
    rc = 98
    try:
        fd = os.open(worker.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.dont_write_bytecode = True  # a stale .pyc of another mutant could be loaded
        here = str(Path(__file__).resolve().parent)
        sys.path[:] = [str(worker.dir)] + [p for p in sys.path if p not in ("", str(ROOT), here)]
        import pytest
        import torch

        torch.set_num_threads(threads)
        args = [
            *tests,
            "-x",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(ROOT),
            "-c",
            str(ROOT / "pyproject.toml"),
        ]
        if keyword:
            args += ["-k", keyword]
        rc = int(pytest.main(args))
        module = sys.modules.get(file.removesuffix(".py").replace("/", "."))
        loaded = Path(getattr(module, "__file__", "") or "").resolve()
        if rc == 0 and loaded != (worker.dir / file).resolve():
            print(f"\nMUTANTS: {file} was loaded from {loaded}, not from the mutant copy", flush=True)
            rc = 97
    except BaseException as error:  # noqa: BLE001 (whatever happens, the child must exit here)
        print(f"\nMUTANTS: {error!r}", flush=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def _failed_test(log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    found = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.MULTILINE)
    if found:
        return found[0]
    tail = [ln for ln in text.strip().splitlines() if ln.strip()]
    return tail[-1][:200] if tail else ""


def run_all(
    jobs: list[tuple[Mutant | None, str, Target]], workers: list[Worker], timeout: float, threads: int
) -> list[tuple[int | None, float, str]]:
    """Run each (mutant or None for the unmutated copy, file, target) in a forked child,
    up to len(workers) at a time. Returns (exit code or None on timeout, seconds, first
    failing test or the log's last line) per job, in order."""
    results: list[tuple[int | None, float, str] | None] = [None] * len(jobs)
    free = list(range(len(workers)))
    running: dict[int, tuple[int, int, float]] = {}  # pid -> (job, worker, start)
    queue = list(range(len(jobs)))
    done = 0
    while done < len(jobs):
        while queue and free:
            index, w = queue.pop(0), free.pop(0)
            mutant, file, target = jobs[index]
            if mutant is not None:
                workers[w].write(file, mutant.source)
            pid = os.fork()
            if pid == 0:
                _child(workers[w], file, list(target.tests), target.keyword, threads)
            running[pid] = (index, w, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        now = time.monotonic()
        if pid == 0:
            for other, (_, _, start) in list(running.items()):
                if now - start > timeout:
                    os.kill(other, signal.SIGKILL)
            time.sleep(0.02)
            continue
        index, w, start = running.pop(pid)
        elapsed = now - start
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and elapsed > timeout:
            code = None
        elif os.WIFSIGNALED(status):
            code = -os.WTERMSIG(status)  # a crash: the mutant is detected
        else:
            code = os.WEXITSTATUS(status)
        results[index] = (code, elapsed, "" if code == 0 else _failed_test(workers[w].log))
        mutant, file, _ = jobs[index]
        if mutant is not None:
            workers[w].restore(file)
        free.append(w)
        done += 1
        if mutant is not None:
            _progress(done, len(jobs), mutant, code)
    return results  # type: ignore[return-value]


def _progress(done: int, total: int, mutant: Mutant, code: int | None) -> None:
    status = "timeout" if code is None else ("survived" if code == 0 else "killed")
    mark = "!" if status != "killed" else " "
    print(f"  [{done:4d}/{total}] {mark} {status:8s} {mutant.describe()}", flush=True)


# ----------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------


def summarise(mutants: list[Mutant], files: list[str]) -> dict[str, dict]:
    table = {}
    for file in files:
        own = [m for m in mutants if m.file == file]
        counts = {s: sum(m.status == s for m in own) for s in ("killed", "survived", "timeout", "equivalent", "error")}
        scored = len(own) - counts["equivalent"]
        table[file] = {
            "tests": list(TARGETS[file].tests),
            "keyword": TARGETS[file].keyword,
            "mutants": len(own),
            **counts,
            "score": counts["killed"] / scored if scored else None,
        }
    return table


def print_table(table: dict[str, dict]) -> None:
    header = (
        f"{'file':24s} {'mutants':>7s} {'killed':>6s} {'survived':>8s} {'timeout':>7s} {'equiv.':>6s} {'score':>7s}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for file, row in table.items():
        score = "-" if row["score"] is None else f"{100 * row['score']:.1f}%"
        print(
            f"{file:24s} {row['mutants']:7d} {row['killed']:6d} {row['survived']:8d} {row['timeout']:7d} "
            f"{row['equivalent']:6d} {score:>7s}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--files", nargs="+", choices=sorted(TARGETS), default=sorted(TARGETS), help="targets")
    parser.add_argument("--limit", type=int, default=None, help="at most this many mutants per file (a sample)")
    parser.add_argument("--seed", type=int, default=0, help="the --limit sample's seed")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per mutant (default: 5 x the clean run + 10)"
    )
    parser.add_argument("--match", default=None, help="only mutants whose description holds this regex")
    parser.add_argument("--check-equivalent", action="store_true", help="run the equivalent mutants too")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--out", type=Path, default=None, help="the JSON (default bench/results/mutants-<UTC>.json)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    utc = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")

    mutants: list[Mutant] = []
    stale = []
    for file in args.files:
        own = generate_mutants(file, TARGETS[file])
        stale += mark_equivalent(own, file)
        if args.match:
            own = [m for m in own if re.search(args.match, m.describe())]
        if args.limit is not None and len(own) > args.limit:
            keep = set(random.Random(args.seed).sample(range(len(own)), args.limit))
            own = [m for i, m in enumerate(own) if i in keep]
        mutants += own
    for entry in stale:
        print(f"warning: EQUIVALENT entry {entry} (the source moved?)")
    if args.list:
        for m in mutants:
            print(m.describe() + (f"   [equivalent: {m.reason}]" if m.status == "equivalent" else ""))
        print(f"{len(mutants)} mutants")
        return 0

    os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest's choice without a GPU, made before any fork
    all_tests = sorted({t for f in args.files for t in TARGETS[f].tests})
    loaded = preload_dependencies(all_tests)
    print(f"preloaded {loaded} modules ({time.monotonic() - started:.1f} s)", flush=True)
    jobs = max(1, args.jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with tempfile.TemporaryDirectory(prefix="jsa-mutants-") as base:
        workers = [Worker(Path(base), i) for i in range(jobs)]
        clean = run_all([(None, f, TARGETS[f]) for f in args.files], workers, 600, threads)
        for file, (code, seconds, failed) in zip(args.files, clean):
            print(f"clean run of {' '.join(TARGETS[file].tests)} for {file}: exit {code}, {seconds:.1f} s")
            if code != 0:
                print(f"the tests fail without a mutation ({failed}): fix them first")
                return 2
        timeout = args.timeout or 5 * max(s for _, s, _ in clean) + 10
        to_run = [m for m in mutants if m.status != "equivalent" or args.check_equivalent]
        print(f"{len(to_run)} mutants to run, {jobs} at a time, timeout {timeout:.0f} s", flush=True)
        results = run_all([(m, m.file, TARGETS[m.file]) for m in to_run], workers, timeout, threads)
    for m, (code, seconds, failed) in zip(to_run, results):
        m.seconds = round(seconds, 2)
        if code in (97, 98):
            m.status, m.killed_by = "error", failed
        elif m.status == "equivalent":
            m.killed_by = failed if code != 0 else ""
        elif code is None:
            m.status = "timeout"
        else:
            m.status, m.killed_by = ("survived", "") if code == 0 else ("killed", failed)

    table = summarise(mutants, args.files)
    print_table(table)
    survivors = [m for m in mutants if m.status in ("survived", "timeout", "error")]
    if survivors:
        print("\nNot killed:")
        for m in survivors:
            print(f"  {m.status:8s} {m.describe()}" + (f"  ({m.killed_by})" if m.killed_by else ""))
    wrong = [m for m in mutants if m.status == "equivalent" and m.killed_by]
    for m in wrong:
        print(f"warning: listed as equivalent but killed by {m.killed_by}: {m.describe()}")
    duration = time.monotonic() - started
    print(f"\n{len(mutants)} mutants in {duration / 60:.1f} min")

    out = args.out or RESULTS / f"mutants-{utc}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tracked = sorted({*args.files, *(t for f in args.files for t in TARGETS[f].tests)})
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    record = {
        "benchmark": "mutants",
        "utc": utc,
        "commit": git("rev-parse", "HEAD"),
        "uncommitted": git("status", "--porcelain", "--", *tracked).splitlines(),  # targets and tests edited
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "duration_s": round(duration, 1),
        "jobs": jobs,
        "limit": args.limit,
        "files": table,
        "survivors": [m.describe() for m in survivors],
        "equivalent": [{"mutant": m.describe(), "reason": m.reason} for m in mutants if m.status == "equivalent"],
        "mutants": [m.record() for m in mutants],
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
