"""`python -m llmserve` is the `llmserve` command.

Where the `llmserve` package lives (setuptools `package-dir` in pyproject.toml): `llmserve/` holds
the CLI, the build tool, the test bed and the quickstart; `operator/` is `llmserve.operator`, the
Kubernetes operator alone; `predictors/` is `llmserve.predictors`. Neither `llmserve/` nor
`operator/` has an `__init__.py`: as namespace portions they resolve in editable installs, and
`operator/` can never shadow the standard library's `operator`, even for a Python started in the
repository root.
"""

import sys

from llmserve.cli import main

sys.exit(main())
