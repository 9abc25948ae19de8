"""`python -m any4_jax.cli` runs the `any4` command."""

import sys

from any4_jax.cli import main

sys.exit(main())
