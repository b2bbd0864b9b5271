"""Optimized model artifacts: build, gate, publish and verify Triton model-repository versions."""
