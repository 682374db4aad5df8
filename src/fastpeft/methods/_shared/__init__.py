"""What several methods share. No method imports another method's folder: shared pieces live here, and
nothing here names a method (callers pass their own labels, tables and layer tests)."""
