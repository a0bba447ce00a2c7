"""jsa-fast as a package others depend on (pyproject.toml, docs/build.md).

- Every module the package imports is declared: torch, numpy and triton as the core
  dependencies, the rest in an extra, and the CLIs' error line names that extra.
- `import jsa_fast` and its public entry points need only the core dependencies.
- Without jsa_fast._C (absent, or built against another torch) k_reciprocal_mask runs the
  PyTorch reference path and warns once.
- The wheel (marked slow and wheel; `make test-wheel`, CI runs it): built with pip,
  installed in a fresh venv that holds only the core dependencies, imported from there.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from jsa_fast.cli import command

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
CORE = {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]}
EXTRAS = {
    extra: {canonicalize_name(Requirement(r).name) for r in requirements}
    for extra, requirements in PROJECT["optional-dependencies"].items()
}
# The modules of each run-time extra, as jsa_fast/cli.py's `command` names them.
EXTRA_MODULES = {
    "torchvision": "train",
    "torchaudio": "train",
    "soundfile": "train",
    "PIL": "train",
    "tqdm": "train",
    "matplotlib": "train",
    "av": "video",
    "nvidia.dali": "dali",
}
CONSOLE_SCRIPTS = {
    "jsa-train": "jsa_fast.entry_points:train",
    "jsa-evaluate": "jsa_fast.entry_points:evaluate",
    "jsa-prepare": "jsa_fast.entry_points:prepare",
    "jsa-localize": "jsa_fast.entry_points:localize",
}


def run_python(code: str, *args: str, python: str = sys.executable, cwd: Path = ROOT, env: dict | None = None):
    return subprocess.run(
        [python, "-c", textwrap.dedent(code), *args],
        cwd=cwd,
        env=env if env is not None else {**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )


# ----------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------


def imported_modules(path: Path) -> set[str]:
    """Dotted names of the absolute imports in a file (`from a.b import c` gives a.b and a.b.c)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_every_imported_distribution_is_a_core_dependency_or_in_an_extra():
    providers = metadata.packages_distributions()
    declared = CORE | set().union(*EXTRAS.values())
    undeclared = {}
    for path in sorted((ROOT / "jsa_fast").rglob("*.py")):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top == "jsa_fast" or top not in providers:
                continue  # not a distribution's (a `from x import attribute` adds x.attribute too)
            dists = {canonicalize_name(d) for d in providers[top]}
            if top == "nvidia":  # a namespace: torch's CUDA libraries and DALI
                dists = {"nvidia-dali-cuda130"} if name.startswith("nvidia.dali") else set()
            if top in ("functorch", "torchgen"):  # shipped inside torch's wheel
                dists = {"torch"}
            if dists and not dists & declared:
                undeclared.setdefault(name, []).append(path.relative_to(ROOT).as_posix())
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_core_dependencies_are_ranges_and_extras_as_documented():
    core = {canonicalize_name(Requirement(r).name): Requirement(r) for r in PROJECT["dependencies"]}
    assert set(core) == {"torch", "numpy", "triton"}
    for requirement in core.values():
        assert not any(spec.operator in ("==", "===") for spec in requirement.specifier), requirement
    assert str(core["numpy"].specifier).count("<2.4") == 1  # 2.4 breaks loops in Triton's interpreter
    assert EXTRAS["train"] == {"torchvision", "torchaudio", "soundfile", "pillow", "tqdm", "matplotlib"}
    assert EXTRAS["video"] == {"av"} and EXTRAS["dali"] == {"nvidia-dali-cuda130"}
    assert {"pytest", "ruff", "ninja", "build"} <= EXTRAS["dev"]
    # The extension compiles against the torch it will run with: not pinned for the build.
    build_requires = {
        canonicalize_name(Requirement(r).name): Requirement(r) for r in PYPROJECT["build-system"]["requires"]
    }
    assert {"setuptools", "wheel", "torch"} <= set(build_requires) and not build_requires["torch"].specifier
    # Each extra holds the distribution of the modules the CLIs name it for.
    providers = metadata.packages_distributions()
    for module, extra in EXTRA_MODULES.items():
        if module == "nvidia.dali":
            assert "nvidia-dali-cuda130" in EXTRAS[extra]
        else:
            assert {canonicalize_name(d) for d in providers[module]} & EXTRAS[extra], (module, extra)


def test_console_scripts_name_each_cli_main():
    assert PROJECT["scripts"] == CONSOLE_SCRIPTS
    entry_points = (ROOT / "jsa_fast" / "entry_points.py").read_text()
    for script, target in CONSOLE_SCRIPTS.items():
        command_name = target.split(":")[1]
        # each runs its command line's main(argv=None) -> int under @command; the wrapper's
        # sys.exit(...) makes the int the exit status (tested on the installed wrapper in the
        # wheel test)
        assert f'return _run("jsa_fast.{command_name}", "{script}")' in entry_points
        source = (ROOT / "jsa_fast" / f"{command_name}.py").read_text()
        assert re.search(r"@command\([^)]*\)\ndef main\(argv: list\[str\] \| None = None\) -> int:", source)


# ----------------------------------------------------------------------------------
# The CLIs name the extra of a missing module
# ----------------------------------------------------------------------------------


@command("jsa-demo")
def demo_main(argv: list[str] | None = None) -> int:
    """A CLI whose work needs a module: argv[0] (argv[1:] for the convention's flags)."""
    importlib.import_module(argv[0])
    return 0


@pytest.mark.parametrize(
    "hidden, imported, module, extra",
    [
        ("tqdm", "tqdm", "tqdm", "train"),
        ("PIL.Image", "PIL.Image", "PIL", "train"),
        ("torchvision", "torchvision.models", "torchvision", "train"),
        ("matplotlib", "matplotlib.figure", "matplotlib", "train"),
        ("av", "av", "av", "video"),
        ("nvidia.dali", "nvidia.dali.fn", "nvidia.dali", "dali"),
        ("nvidia", "nvidia.dali", "nvidia.dali", "dali"),  # a CPU torch has no nvidia namespace at all
    ],
)
def test_cli_names_the_extra_of_a_missing_module(monkeypatch, capsys, hidden, imported, module, extra):
    monkeypatch.setitem(sys.modules, hidden, None)  # `import hidden` raises ModuleNotFoundError
    if imported != hidden:  # imported already (by other tests): import it again, under the hidden parent
        monkeypatch.delitem(sys.modules, imported, raising=False)
    monkeypatch.delenv("JSA_FAST_DEBUG", raising=False)
    assert demo_main([imported]) == 2
    assert capsys.readouterr().err == f"jsa-demo: error: {module} is not installed: pip install 'jsa-fast[{extra}]'\n"


def test_cli_missing_module_with_debug_prints_the_traceback_first(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert demo_main(["tqdm", "--debug"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith(
        "jsa-demo: error: tqdm is not installed: pip install 'jsa-fast[train]'\n"
    )


def test_cli_missing_module_of_no_extra_is_not_hidden(monkeypatch):
    with pytest.raises(ModuleNotFoundError, match="jsa_fast_no_such_module"):
        demo_main(["jsa_fast_no_such_module"])


@pytest.mark.parametrize("script", CONSOLE_SCRIPTS)
def test_a_console_script_without_its_extras_names_them_in_one_line(script):
    # The command lines import their extras when imported: the console script imports its
    # command line inside the check that names the extra (jsa_fast.entry_points).
    module, function = CONSOLE_SCRIPTS[script].split(":")
    hide = "".join(f"sys.modules[{name!r}] = None\n" for name in NOT_CORE)
    result = run_python(f"import sys\n{hide}from {module} import {function}\nsys.exit({function}())\n")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), lines
    assert "is not installed: pip install 'jsa-fast[" in lines[0]


# ----------------------------------------------------------------------------------
# The core path needs only the core dependencies; the extension is optional
# ----------------------------------------------------------------------------------

# Modules of the extras, and what only the CLIs and data readers load.
NOT_CORE = ("av", "matplotlib", "torchvision", "torchaudio", "tqdm", "PIL", "soundfile", "nvidia.dali")

CORE_CHECK = """
import sys
import torch
import jsa_fast
from jsa_fast import FusedJointSlotAttention, JointSlotAttention, k_reciprocal_mask, ops, reference

torch.manual_seed(0)
reference_module = JointSlotAttention(dim=16, num_slots=2, iters=2, mlp_hidden=24).eval()
fused = FusedJointSlotAttention(dim=16, num_slots=2, iters=2, mlp_hidden=24, backend=sys.argv[1]).eval()
fused.load_state_dict(reference_module.state_dict())
x_img, x_aud = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 3, 16)
masks = torch.rand(2, 5) < 0.3, torch.rand(2, 3) < 0.3
got, want = fused(x_img, x_aud, *masks), reference_module(x_img, x_aud, *masks)
for name, a, b in zip(got._fields, got, want):  # tests/test_fused.py's fp32 tolerances
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
(grad_fused,) = torch.autograd.grad(got.slots_img.sum(), x_img)
(grad_reference,) = torch.autograd.grad(want.slots_img.sum(), x_img)
scale = grad_reference.abs().max()
torch.testing.assert_close(grad_fused / scale, grad_reference / scale, atol=1e-4, rtol=0)

z_img, z_aud = torch.randn(12, 6), torch.randn(12, 6)
mask = k_reciprocal_mask(z_img, z_aud, 3)
assert torch.equal(mask, reference.k_reciprocal_mask(z_img, z_aud, 3))
assert torch.equal(k_reciprocal_mask(z_img, z_aud, 3, packed=True), ops.pack_mask(mask))
loaded = sorted(name for name in NOT_CORE if sys.modules.get(name) is not None)  # None: hidden
assert not loaded, f"import jsa_fast loaded {loaded}"
print("extension", ops.extension_available("cpu"), jsa_fast.__file__, getattr(sys.modules.get("jsa_fast._C"), "__file__", None))
""".replace("NOT_CORE", repr(NOT_CORE))


def test_core_path_runs_with_every_extra_missing():
    hide = "".join(f"sys.modules[{name!r}] = None\n" for name in NOT_CORE)
    result = run_python("import sys\n" + hide + CORE_CHECK, "torch")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("extension True ")


HIDE_EXTENSION = """
import sys, warnings
kind = sys.argv[1]


class Unloadable:
    # jsa_fast._C as a build for another torch fails to load (or a missing libc10.so).
    def find_spec(self, name, path=None, target=None):
        if name == "jsa_fast._C":
            if kind == "oserror":
                raise OSError("libc10.so: cannot open shared object file: No such file or directory")
            raise ImportError("jsa_fast/_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")
        return None


if kind == "absent":
    sys.modules["jsa_fast._C"] = None
elif kind == "stale":
    # Built from older sources: it loads, and registers the op without check_finite.
    import types

    import torch

    sys.modules["jsa_fast._C"] = types.ModuleType("jsa_fast._C")
    stale = torch.library.Library("jsa_fast", "DEF")
    stale.define("k_reciprocal_mask(Tensor z_img, Tensor z_aud, int k, bool packed=False) -> Tensor")
else:
    sys.meta_path.insert(0, Unloadable())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch
    from jsa_fast import k_reciprocal_mask, ops, reference

    assert not caught, [str(w.message) for w in caught]  # importing says nothing
    torch.manual_seed(0)
    z_img, z_aud = torch.randn(12, 6), torch.randn(12, 6)
    masks = [k_reciprocal_mask(z_img, z_aud, 3), k_reciprocal_mask(z_img, z_aud, 3, packed=True)]
    masks.append(k_reciprocal_mask(z_img.double(), z_aud.double(), 5))
assert not ops.extension_available("cpu")
assert torch.equal(masks[0], reference.k_reciprocal_mask(z_img, z_aud, 3))
assert torch.equal(masks[1], ops.pack_mask(masks[0]))
assert torch.equal(masks[2], reference.k_reciprocal_mask(z_img.double(), z_aud.double(), 5))
for w in caught:
    print(f"{w.category.__name__}: {w.message}")
"""


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("absent", "import of jsa_fast._C halted"),
        ("undefined-symbol", "jsa_fast/_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev"),
        ("oserror", "libc10.so: cannot open shared object file"),
        ("stale", "built from older sources, its op takes (z_img, z_aud, k, packed)"),
    ],
)
def test_without_the_extension_k_reciprocal_mask_runs_the_reference_and_warns_once(kind, reason):
    result = run_python(HIDE_EXTENSION, kind)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, lines  # three calls, one warning
    assert lines[0].startswith(f"RuntimeWarning: jsa_fast._C is not usable ({reason}")
    assert "k_reciprocal_mask runs the PyTorch reference path" in lines[0]
    assert "pip install --no-build-isolation" in lines[0]


# ----------------------------------------------------------------------------------
# The wheel, in a fresh venv with only the core dependencies
# ----------------------------------------------------------------------------------


def dependency_closure(roots: list[str], site: Path) -> dict[str, metadata.Distribution]:
    """The installed distributions `roots` need (Requires-Dist, markers evaluated for this
    interpreter, extras not taken), by canonical name."""
    installed = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions(path=[str(site)])}
    closure: dict[str, metadata.Distribution] = {}
    todo = [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        assert name in installed, f"{name} is required (by {sorted(closure)}) but not installed in {site}"
        closure[name] = installed[name]
        for line in installed[name].requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return closure


def link_distributions(names: set[str], site: Path, target: Path) -> None:
    """Symlink into `target` what the distributions `names` installed in `site` (by their
    RECORD): a folder whole where no other distribution owns a file in it (torch/), file
    by file where others do (the nvidia/ namespace: not DALI's half)."""
    owners: dict[tuple[str, ...], set[str]] = {}
    children: dict[tuple[str, ...], set[tuple[str, ...]]] = {(): set()}
    for dist in metadata.distributions(path=[str(site)]):
        name = canonicalize_name(dist.metadata["Name"])
        for file in dist.files or []:
            parts = Path(file).parts
            if not parts or parts[0] == ".." or Path(file).is_absolute():
                continue  # scripts in bin/ and data outside site-packages
            for depth in range(1, len(parts) + 1):
                owners.setdefault(parts[:depth], set()).add(name)
                children.setdefault(parts[: depth - 1], set()).add(parts[:depth])

    def place(parts: tuple[str, ...]) -> None:
        source = site.joinpath(*parts)
        if not (owners[parts] & names) or not (source.exists() or source.is_symlink()):
            return
        if owners[parts] <= names:
            target.joinpath(*parts).parent.mkdir(parents=True, exist_ok=True)
            target.joinpath(*parts).symlink_to(source)
        else:
            for child in sorted(children.get(parts, ())):
                place(child)

    for top in sorted(children[()]):
        place(top)


WHEEL_CHECK = """
import sys, sysconfig
site = sysconfig.get_paths()["purelib"]
import jsa_fast
assert jsa_fast.__file__.startswith(site), (jsa_fast.__file__, site)
import jsa_fast._C
assert jsa_fast._C.__file__.startswith(site), jsa_fast._C.__file__
"""


@pytest.mark.slow
@pytest.mark.wheel
def test_wheel_installs_and_runs_with_only_the_core_dependencies(tmp_path):
    # sdist, then the wheel from the unpacked sdist (python -m build's way: what the sdist
    # lacks fails the build), against this environment's torch (--no-isolation).
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert build.returncode == 0, build.stdout[-5000:] + build.stderr[-5000:]
    check_built_distributions(dist, tmp_path)


def check_built_distributions(dist: Path, tmp_path: Path) -> None:
    """What test_wheel_... checks of the sdist and wheel in `dist`."""
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        sources = {Path(*Path(name).parts[1:]).as_posix() for name in archive.getnames() if len(Path(name).parts) > 1}
    assert {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").iterdir()} <= sources
    (wheel,) = dist.glob("jsa_fast-*.whl")
    # The wheel's metadata: the core dependencies as ranges, the extras, the console scripts.
    with zipfile.ZipFile(wheel) as archive:
        info = next(name.split("/")[0] for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        wheel_metadata = archive.read(f"{info}/METADATA").decode() + archive.read(f"{info}/entry_points.txt").decode()
        assert any(re.fullmatch(r"jsa_fast/_C\..*\.so", name) for name in archive.namelist())
    requires = [
        Requirement(line.removeprefix("Requires-Dist: "))
        for line in wheel_metadata.splitlines()
        if line.startswith("Requires-Dist: ")
    ]
    core_requires = {str(r) for r in requires if "extra" not in str(r.marker)}
    assert core_requires == {str(Requirement(r)) for r in PROJECT["dependencies"]}
    assert all(f"Provides-Extra: {extra}" in wheel_metadata for extra in EXTRAS)
    assert all(f"{name} = {target}" in wheel_metadata for name, target in CONSOLE_SCRIPTS.items())

    # A fresh venv holding only torch, numpy and triton and what they require (linked from
    # this environment's site-packages, not downloaded again), then the wheel without deps.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    fresh_site = Path(
        run_python("import sysconfig; print(sysconfig.get_paths()['purelib'])", python=python, env={}).stdout.strip()
    )
    site = Path(sysconfig.get_paths()["purelib"])
    core = [Requirement(r) for r in PROJECT["dependencies"]]
    closure = dependency_closure([r.name for r in core if r.marker is None or r.marker.evaluate()], site)
    assert not (EXTRAS["train"] | EXTRAS["video"] | EXTRAS["dali"]) & set(closure), sorted(closure)
    link_distributions(set(closure), site, fresh_site)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [sys.executable, "-m", "pip", "--python", python, "--disable-pip-version-check"]  # none in the venv
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", str(wheel)], env=env, capture_output=True, text=True
    )
    assert install.returncode == 0, install.stdout + install.stderr
    check = subprocess.run([*pip, "check"], env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    listed = subprocess.run([*pip, "list", "--format=freeze"], env=env, capture_output=True, text=True).stdout
    installed = {canonicalize_name(line.split("==")[0]) for line in listed.splitlines()}
    assert installed == set(closure) | {"jsa-fast"}, sorted(installed ^ (set(closure) | {"jsa-fast"}))

    # Run from outside the source tree: the package, its extension and the fused operator
    # (under Triton's interpreter) from the fresh venv, no extra loaded.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = run_python(
        WHEEL_CHECK + CORE_CHECK, "triton", python=python, cwd=outside, env={**env, "TRITON_INTERPRET": "1"}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"extension True {fresh_site}/jsa_fast/__init__.py {fresh_site}/jsa_fast/_C."), (
        result.stdout
    )

    # The console scripts are installed; the wrapper pip wrote exits with main()'s status
    # (run by this environment's Python, which has the extras the CLIs import).
    for name in CONSOLE_SCRIPTS:
        assert (venv / "bin" / name).is_file()
    cli = subprocess.run(
        [sys.executable, str(venv / "bin" / "jsa-evaluate"), "--checkpoint", "x", "--no-such-flag"],
        cwd=outside,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (cli.returncode, cli.stderr) == (
        2,
        "jsa_fast.evaluate: error: unrecognized arguments: --no-such-flag (see --help)\n",
    )
