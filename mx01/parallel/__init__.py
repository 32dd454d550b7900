"""Parallelism with shard_map: mesh and sharding rules, expert-parallel MoE, LASP+, ring attention, sharded step."""
