"""The engine on Ray Serve: an HTTP ingress, one engine replica per GPU, task-affinity routing."""
