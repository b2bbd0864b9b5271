"""`python -m llmserve` is the `llmserve` command.

`operator/` is the source root of the `llmserve` package (setuptools package-dir). It has no
`__init__.py` on purpose: as a namespace portion it can never shadow the standard library's
`operator` module, even for a Python started in the repository root.
"""

import sys

from llmserve.cli import main

sys.exit(main())
