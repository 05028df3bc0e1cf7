"""`python -m llasm_jax.cli`: the `llasm-jax` command."""

import sys

from llasm_jax.cli import main

sys.exit(main())
