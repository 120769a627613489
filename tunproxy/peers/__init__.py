"""Where the subnet-to-host table comes from: a static list or etcd."""
