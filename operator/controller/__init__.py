"""The LLMService operator: pure builders, one apply path, kopf wiring."""
