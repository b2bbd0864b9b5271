"""Closed-loop inference load against a Triton server's HTTP endpoint (KServe V2 `infer`, or
Triton's `generate` endpoint for a decoupled LLM model).

`concurrency` clients each send the next request as soon as the previous one is answered, the way
a fixed pool of callers loads a service: the offered load is set by the number of clients, not by
a rate, so a slower server sees the same pressure instead of a growing backlog in the client.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass
class LoadStats:
    requests: int = 0
    failures: int = 0
    last_error: str = ""
    seconds: float = 0.0


class InferenceLoad:
    """`InferenceLoad(url, model, inputs, concurrency).start()` ... `.stop()` -> LoadStats.

    `inputs` is the V2 `inputs` list, e.g. `[{"name": "INPUT0", "shape": [4], "datatype": "FP32",
    "data": [1, 2, 3, 4]}]`, or for the generate endpoint its JSON object, e.g. `{"text_input":
    "Hello", "max_tokens": 32}` (with `endpoint="generate"`).
    """

    def __init__(self, http_url: str, model: str, inputs: list[dict] | dict, concurrency: int, timeout: float = 30.0,
                 endpoint: str = "infer"):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.url = f"{http_url.rstrip('/')}/v2/models/{model}/{endpoint}"
        self.body = json.dumps({"inputs": inputs} if endpoint == "infer" else inputs).encode()
        self.concurrency, self.timeout = concurrency, timeout
        self.stats = LoadStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = 0.0

    def start(self) -> InferenceLoad:
        self._stop.clear()
        self._started = time.monotonic()
        self._threads = [threading.Thread(target=self._client, name=f"load-{i}", daemon=True)
                         for i in range(self.concurrency)]
        for thread in self._threads:
            thread.start()
        return self

    def _client(self) -> None:
        while not self._stop.is_set():
            request = urllib.request.Request(self.url, data=self.body, headers={"Content-Type": "application/json"})
            error = ""
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    response.read()
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                error = str(exc)
                self._stop.wait(0.1)  # a refusing server must not turn the client into a busy loop
            with self._lock:
                self.stats.requests += 1
                if error:
                    self.stats.failures += 1
                    self.stats.last_error = error

    def stop(self) -> LoadStats:
        """Stop every client (each finishes its request in flight) and return the totals."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
        self._threads = []
        self.stats.seconds = time.monotonic() - self._started
        return self.stats

    def __enter__(self) -> InferenceLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
