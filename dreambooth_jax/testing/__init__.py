"""Tiny random models, encoders and datasets for the demo and the tests (torch-free). The runtime never
imports this package."""
