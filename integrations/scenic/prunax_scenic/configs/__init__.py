"""Example Scenic configs: pass a file's path to ``python -m scenic.main --config=``."""
