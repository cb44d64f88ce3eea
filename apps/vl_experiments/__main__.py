"""``python -m apps.vl_experiments``: the vision-language comparison from the command line."""

import sys

from apps.vl_experiments.cli import main

sys.exit(main())
