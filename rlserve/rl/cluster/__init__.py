"""Training over several processes: FSDP2 trainer ranks and rollout servers, as plain processes on this
machine (local.py) or as Ray actors in a placement group (ray.py). docs/cluster.md."""
