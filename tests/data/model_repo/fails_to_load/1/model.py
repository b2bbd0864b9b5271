"""fails_to_load, version 1: refuses to initialize, with a message the test looks for in the log."""


class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("fails_to_load refuses to initialize (expected by the test)")
