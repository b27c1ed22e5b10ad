"""The agent on each instance: health, progress, checkpoint-now, restore, and
the job's endpoint, over the HTTP contract in ``gpuscout.agent.protocol``.

Run it with ``python -m gpuscout.agent``. The modules: ``protocol`` (the wire
contract), ``core`` (pure decisions), ``config`` (environment),
``supervisor`` (the job's process), ``server`` (HTTP).
"""
