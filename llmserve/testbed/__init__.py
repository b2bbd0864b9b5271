"""The local test bed: a real Kubernetes control plane with KWOK GPU nodes, Triton and Prometheus."""
