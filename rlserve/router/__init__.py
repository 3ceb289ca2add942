"""Data parallelism: rlserve servers as workers of sglang-router (imported lazily; the `router` extra).

launch.RouterProcess runs the router in front of worker URLs; dp.DataParallel starts N servers and the
router and keeps the workers alive; commands.py holds `rlserve serve --dp N` and `rlserve router`.
"""
