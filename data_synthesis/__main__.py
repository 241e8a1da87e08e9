"""``python -m data_synthesis RECIPE.yaml [key=value ...]`` (see data_synthesis/runner.py)."""

from alignment.config import run_cli
from data_synthesis.runner import main

if __name__ == "__main__":
    run_cli(main)
