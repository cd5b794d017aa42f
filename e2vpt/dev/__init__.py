"""Development tools, not used by a deployed server's request path: a local Redis (`localredis`) and
deterministic test images (`images`)."""
