"""Helpers the tests share that are no part of tunproxy: the pure-Python packet model (``packets``)."""
