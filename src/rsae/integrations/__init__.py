"""Bridges to other SAE libraries; each module imports its library and is optional
(`import rsae` never imports them)."""
