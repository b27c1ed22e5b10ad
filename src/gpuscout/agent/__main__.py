"""``python -m gpuscout.agent``: the agent of one instance.

Configured only by the environment listed in ``gpuscout.agent.protocol``;
logs go to stderr. Exit codes: 0 after SIGTERM/SIGINT (the job's command is
stopped first), 2 for a bad configuration, 1 if the server cannot start.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from gpuscout.agent.config import AgentConfig, ConfigError
from gpuscout.agent.server import run_agent


def main() -> int:
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per forwarded request would drown the state changes.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        config = AgentConfig.from_env()
    except ConfigError as exc:
        print(f"gpuscout agent: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run_agent(config))
    except OSError as exc:  # the address is taken, the host does not resolve, ...
        print(f"gpuscout agent: cannot listen on {config.host}:{config.port}: {exc}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
