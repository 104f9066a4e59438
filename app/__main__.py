"""``python -m vitslim_app [RUN ...]`` starts the exploration app (see ``vitslim_app.main``)."""
import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
