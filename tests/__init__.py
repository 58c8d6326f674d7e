"""The test suite; imported before conftest.py and every test module, so it sets up the process first."""

import os

# pytest-xdist's workers inherit COLUMNS=80, and rich fixes a console's width from it when the console
# is made (the CLI's is made on import): tests that give CliRunner a wider COLUMNS would see 80.
for _size in ("COLUMNS", "LINES"):
    os.environ.pop(_size, None)
