"""ssmforge: distributed pretraining of state space language models.

The packages `ssmforge.models`, `ssmforge.kernels`, `ssmforge.data_pipeline`, `ssmforge.pretrain` and
`ssmforge.evaluation` live in the repository's top-level folders of the same names (mapped in
pyproject.toml); this package holds what sits above or beside them: the command line (`ssmforge.cli`)
and the user-error types (`ssmforge.errors`). Importing it is cheap: nothing heavy loads until a
subpackage is used.
"""

__version__ = "0.1.0"
