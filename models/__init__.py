"""Scripts that build or export the demo and test models (not part of the installed package)."""
