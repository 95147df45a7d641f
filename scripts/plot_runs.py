"""`kdrun-plot` (kdrun/tools/plot.py) under its old name: python scripts/plot_runs.py DIRS -o runs.png."""

from kdrun.tools.plot import main

if __name__ == "__main__":
    main()
