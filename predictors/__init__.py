"""The KServe predictor that fronts Triton with OpenAI-compatible and V2 APIs."""
