"""A nostr-sdk LocalRelay on loopback for discovery tests and benchmarks, run in a background thread."""

from __future__ import annotations

import asyncio
import threading


class RelayThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self._ready = threading.Event()
        self._relay = None
        self.thread = threading.Thread(target=self._run, name="nostr-relay", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def boot() -> None:
            from nostr_sdk import LocalRelayBuilder

            # no .port(): .port(0) reports ws://127.0.0.1:0 and clients fail to connect
            self._relay = LocalRelayBuilder().addr("127.0.0.1").build()
            await self._relay.run()
            self.url = str(await self._relay.url())
            self._ready.set()

        self.loop.run_until_complete(boot())
        self.loop.run_forever()

    def start(self) -> "RelayThread":
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("nostr LocalRelay did not start")
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

