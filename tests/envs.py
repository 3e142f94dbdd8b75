"""Environments for child processes in the tests."""

import os


def clean_env() -> dict[str, str]:
    """This process's environment without what points Python at this project's venv (Ray, for one, sets
    PYTHONPATH for its workers): a child in another venv sees only that venv."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
