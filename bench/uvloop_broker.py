"""`python -m bench.uvloop_broker run ...`: ota-broker's own command line, on uvloop's event loop.

For the event-loop comparison (`bench.run --brokers ota,ota_uvloop`) only: uvloop is not a dependency of
ota-broker (docs/benchmarks.md, "The event loop"), so it is installed with the `[bench]` extra. The
policy is set before the CLI starts, and `asyncio.run` then makes uvloop's loop.
"""

from __future__ import annotations

import asyncio

import uvloop

from broker.cli import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    main()
