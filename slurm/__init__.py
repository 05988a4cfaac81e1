"""SLURM jobs: the sbatch template and its rendering, submission and status (`ssmforge submit`)."""
from ssmforge import refuse_bare_import

refuse_bare_import(__name__)
