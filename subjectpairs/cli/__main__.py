"""``python -m subjectpairs.cli``."""

from subjectpairs.cli import app

if __name__ == "__main__":
    app()
