"""Redaction: PII and secrets found in the text that goes to the model, and
what replaces them (see stage.py for where it looks, detect.py for what)."""
