"""Agentic RL: multi-turn, tool-using rollouts, token in / token out (docs/rl.md "Agentic rollouts").

sample.py (Sample: ids, loss mask, logprobs, versions, status) · render.py (template segments as ids) ·
backend.py (engine / server turns) · loop.py (the agent loop) · tools.py, sandbox.py, lookup.py (tools) ·
tasks.py (a task that needs the tool) · rollout.py (agent_rollout → Rollout for the trainer)
"""
