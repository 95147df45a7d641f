"""`kdrun-table` (kdrun/tools/table.py) under its old name: python scripts/make_table.py DIRS [options]."""

from kdrun.tools.table import main

if __name__ == "__main__":
    main()
