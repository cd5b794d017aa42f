"""The prompt registry: the Redis system of record (`store`: keys, versions, events), its HTTP API
(`api`), the one HTTP client (`client`) and the `e2vpt tasks` / `e2vpt registry` commands (`cli`)."""
