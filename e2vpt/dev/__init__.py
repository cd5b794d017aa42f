"""Development tools, not used by a deployed server's request path: a local Redis (`localredis`),
deterministic test images (`images`), the tiny backbone (`tiny`) and the registry API in a child process
(`registry`)."""
