"""The benchmark harness of tunproxy: `python -m bench` (see bench/__main__.py)."""
