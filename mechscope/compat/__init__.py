"""Compatibility façades: Transformer Debugger's API (``mechscope.compat.tdb``)."""
