"""ssmforge: distributed pretraining of state space language models.

The packages `ssmforge.models`, `ssmforge.kernels`, `ssmforge.data_pipeline`, `ssmforge.pretrain`,
`ssmforge.evaluation` and `ssmforge.slurm` live in the repository's top-level folders of the same names
(mapped in pyproject.toml); this package holds what sits above or beside them: the command line
(`ssmforge.cli`), the user-error types (`ssmforge.errors`) and the launcher-variable mapping
(`ssmforge.launcher_env`). Importing it is cheap: nothing heavy loads until a subpackage is used.
"""
from pathlib import Path as _Path

__version__ = "0.1.0"


def refuse_bare_import(name: str) -> None:
    """Called first by each top-level folder's __init__: imported as `kernels` rather than
    `ssmforge.kernels` (the repository root on sys.path, as `python -m pytest` puts it there), the folder
    would shadow packages of that name (Hugging Face's `kernels`, which transformers imports) and register
    ssmforge's custom operators a second time, freeing the first registration under the live one."""
    if not name.startswith("ssmforge."):
        raise ImportError(f"{name!r} here is a folder of ssmforge, importable only as 'ssmforge.{name}'", name=name)

# Run from a source checkout (the current folder first on sys.path), `ssmforge` is this folder, which
# holds none of the subpackages: find them in the checkout's top-level folders, as the mapping does.
if not (_Path(__file__).parent / "models").is_dir() and (_Path(__file__).parent.parent / "models").is_dir():
    __path__.append(str(_Path(__file__).parent.parent))
