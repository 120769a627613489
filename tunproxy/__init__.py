"""tunproxy: a flannel-style IPv4 overlay with udp, vxlan and host-gw backends."""

__version__ = "0.1.0"
