"""Tollway: an Envoy ext_proc gateway for LLM APIs."""

__version__ = "0.1.0"
