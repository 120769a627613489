"""The network-namespace lab: hosts, etcd and pods in namespaces, for the demos, tests and bench.

No part of the installed tunproxy (pyproject's packages leave it out, and
tunproxy never imports it): it runs from a checkout, ``python3 -m lab.demo``.
"""
