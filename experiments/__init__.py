"""Command-line experiment scripts (run with ``python -m experiments.<name>``)."""
