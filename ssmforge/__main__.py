"""`python -m ssmforge` is the `ssmforge` command."""
import sys

from ssmforge.cli import main

sys.exit(main())
