"""The tiny converted checkpoints of the inference tests serve the server tests too."""

from tests.infer.conftest import ckpts  # noqa: F401 (a fixture)
