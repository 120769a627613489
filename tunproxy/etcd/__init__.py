"""Leases and the network config in etcd v3, in flannel's key layout.

Pure modules (no asyncio, no sockets, no clock; they import only the model
layer and the standard library): ``acquire`` (which subnet to take),
``keeper`` (keeping our lease: renew, verify, re-acquire, revoke what we
left), ``cursor`` (where the watch resumes, when it relists), ``values``
(what a key and value say), ``endpoints`` and ``retry``. The I/O around
them: ``connection`` (gRPC clients, TLS, auth, retries), ``watch_loop``
(the listing and the watch stream), ``registry`` (``EtcdRegistry``, the
daemon's view, running the keeper's actions) and ``listing`` (the
``tunproxy leases`` command).
"""
