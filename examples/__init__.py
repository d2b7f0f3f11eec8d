"""Example applications built on dsm-lightning (not part of the installed package)."""
