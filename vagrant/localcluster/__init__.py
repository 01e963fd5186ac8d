"""A local cluster on one host: real etcd members and one systemd user manager per machine."""
