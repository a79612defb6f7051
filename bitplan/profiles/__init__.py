"""Hardware profiles: measured latency and memory of every option on a device, and the cost model (issue: profiles)."""
