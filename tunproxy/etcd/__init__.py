"""Leases and the network config in etcd v3, in flannel's key layout.

Pure modules (no asyncio, no sockets, no clock; they import only the model
and the standard library): ``acquire`` (which subnet to take), ``keeper``
(keeping our lease: renew, verify, re-acquire, revoke what we left),
``watch`` (where the watch resumes, when it relists), ``endpoints`` and
``retry``. The I/O around them: ``connection`` (gRPC clients, TLS, auth,
retries), ``registry`` (``EtcdRegistry``, the daemon's view) and
``listing`` (the ``tunproxy leases`` command).
"""
