"""SLURM jobs: the sbatch template and its rendering, submission and status (`ssmforge submit`)."""
