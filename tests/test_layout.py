"""The package layout: one `ssmforge` import namespace, imports that only point down the layers, and a
wheel that installs nothing but `ssmforge/...`."""
import ast
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

import ssmforge

ROOT = Path(__file__).resolve().parents[1]
OLD_NAMES = {"models", "kernels", "pretrain", "evaluation", "data_pipeline"}
# folder -> subpackage; `ssmforge/` itself holds the CLI, the errors and the package's root
FOLDERS = {"ssmforge": "ssmforge", **{name: f"ssmforge.{name}" for name in (*OLD_NAMES, "slurm")}}
# cli -> evaluation, slurm -> pretrain -> models, data_pipeline -> kernels; errors below everything.
# A module may import its own package and packages of a lower layer only (models and data_pipeline
# share a layer and do not import each other).
LAYER = {
    "ssmforge.errors": 0,
    "ssmforge.kernels": 1,
    "ssmforge.launcher_env": 1,  # launcher variables -> torch's names; imports only errors
    "ssmforge.models": 2,
    "ssmforge.data_pipeline": 2,
    "ssmforge.pretrain": 3,
    "ssmforge.stages": 3.5,  # the pipeline of `ssmforge run`: runs the stage commands, imports pretrain.config
    "ssmforge.evaluation": 4,
    "ssmforge.slurm": 4,
    "ssmforge.cli": 5,
    "ssmforge.__main__": 6,
    "ssmforge": 0,  # ssmforge/__init__.py: the version, nothing else
}


def package_of(module: str) -> str:
    """The LAYER key a dotted module name belongs to."""
    parts = module.split(".")
    return ".".join(parts[:2]) if ".".join(parts[:2]) in LAYER else parts[0]


def library_modules():
    """(dotted name, path) of every module of the installed packages."""
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([package, *parts]), path


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, relative imports resolved."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            # `from ssmforge import kernels` imports the subpackage
            found += [(node.lineno, f"{name}.{alias.name}" if name == "ssmforge" else name) for alias in node.names]
    return found


def test_imports_point_down_the_layers():
    wrong = []
    for module, path in library_modules():
        own = package_of(module)
        for line, target in imported_modules(path, module):
            if target.split(".")[0] in OLD_NAMES:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports the old top-level name {target}")
            if not target.startswith("ssmforge"):
                continue
            other = package_of(target)
            if other != own and LAYER[other] >= LAYER[own]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({own}) imports {target} ({other}), which is not "
                             f"below it")
    assert not wrong, "\n".join(wrong)


def test_layer_check_catches_an_upward_import(tmp_path):
    # the check itself: a kernels module importing the trainer is reported
    path = tmp_path / "bad.py"
    path.write_text("from ssmforge.pretrain import trainer\nfrom ..models import lm\n")
    targets = [t for _, t in imported_modules(path, "ssmforge.kernels.bad")]
    assert targets == ["ssmforge.pretrain", "ssmforge.models"]
    assert all(LAYER[package_of(t)] > LAYER["ssmforge.kernels"] for t in targets)


def test_no_file_uses_the_old_top_level_names():
    """Tests and benchmarks import through the namespace too (a bare `import models` would find the folder)."""
    wrong = []
    for folder in ("tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            for line, target in imported_modules(path, module):
                if target.split(".")[0] in OLD_NAMES:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)



BARE_IMPORTS = """
import importlib, json, sys
from torch._library.custom_ops import OPDEFS
from ssmforge.kernels.cpu.conv1d import causal_conv1d_cpu_op
refused = {}
for name in %r:
    try:
        importlib.import_module(name)
    except ImportError as err:
        refused[name] = str(err)
import transformers.integrations.hub_kernels  # its `from kernels import ...` means Hugging Face's package
print(json.dumps({"refused": refused, "kernels_loaded": "kernels" in sys.modules,
                  "same_op": OPDEFS["ssmforge::causal_conv1d_cpu"] is causal_conv1d_cpu_op}))
"""


def test_a_bare_import_of_a_folder_is_refused_and_leaves_the_operators_registered():
    """From the checkout's root (first on sys.path under `python -m pytest`), `import kernels` used to find
    our folder: transformers' import of Hugging Face's `kernels` registered ssmforge's custom operators a
    second time and freed the live registration, so later kernel calls crashed or raised std::bad_alloc.
    Every folder now refuses a bare import, which transformers takes as its package being absent."""
    pytest.importorskip("transformers")
    names = sorted(OLD_NAMES | {"slurm"})
    result = subprocess.run([sys.executable, "-c", BARE_IMPORTS % names], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["same_op"], "the operator registered by ssmforge.kernels was replaced"
    assert not report["kernels_loaded"]
    assert report["refused"] == {name: f"{name!r} here is a folder of ssmforge, importable only as 'ssmforge.{name}'"
                                 for name in names}

@pytest.mark.slow
def test_the_wheel_installs_only_the_ssmforge_namespace(tmp_path):
    """A non-editable install holds ssmforge/... alone: `import models` fails outside the repository while
    `import ssmforge.models` works (dependencies come from this environment through a .pth line)."""
    # build from a copy: setuptools leaves build/ and *.egg-info beside the sources it builds
    source, dist = tmp_path / "source", tmp_path / "dist"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in FOLDERS:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(source)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = dist.glob("ssmforge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"ssmforge", wheel.name.split("-py")[0] + ".dist-info"}, tops
    assert "ssmforge/slurm/job.sbatch" in names and "ssmforge/models/lm.py" in names
    assert "ssmforge/cli.py" in names and "ssmforge/__main__.py" in names
    assert not any(name.startswith("ssmforge/tests") for name in names)

    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    python = fresh / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, cwd=tmp_path)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    Path(site, "deps.pth").write_text(deps + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    run = lambda code: subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    for name in sorted(OLD_NAMES):
        result = run(f"import {name}")
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, (name, result.stderr[-300:])
    result = run("import ssmforge.models, ssmforge.kernels, ssmforge.cli; print(ssmforge.models.__file__)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().startswith(site), result.stdout
    result = subprocess.run([str(python), "-m", "ssmforge", "--version"], capture_output=True, text=True, cwd=tmp_path,
                            env=env)
    assert result.returncode == 0 and result.stdout.strip() == f"ssmforge {ssmforge.__version__}", result.stderr[-2000:]
    # from the checkout's root the source folder `ssmforge/` comes first on sys.path: its subpackages are found
    # in the checkout's top-level folders, not lost
    result = subprocess.run([str(python), "-c", "import ssmforge.models, ssmforge.cli; print(ssmforge.models.__file__)"],
                            capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(ROOT / "models" / "__init__.py")
    result = subprocess.run([str(python), "-m", "ssmforge", "--version"], capture_output=True, text=True, cwd=ROOT,
                            env=env)
    assert result.returncode == 0 and result.stdout.strip() == f"ssmforge {ssmforge.__version__}", result.stderr[-2000:]
