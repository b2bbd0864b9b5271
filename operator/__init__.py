"""llmserve: Kubernetes-native serving of optimized LLM artifacts on NVIDIA Triton.

The source root of this package is the repository's ``operator/`` folder; it is installed under the
name ``llmserve`` so it never shadows the standard library's ``operator`` module.
"""

__version__ = "0.1.0"
