"""One HTTP/2 (h2c, prior knowledge) client for the e2e tests, that copes with early responses.

httpx gives up when a server answers (413) and resets the stream while the
client is still sending; real clients then read the answer, and so does this.
It sends the body as flow control allows (then any trailers) and records what
the server sends, frame by frame.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import orjson

if TYPE_CHECKING:
    from .conftest import Stack


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    reset: int | None = None  # HTTP/2 RST_STREAM error code, if the stream was reset
    events: list[str] = field(default_factory=list)  # "headers", "end_stream", "rst_stream(...)"

    def error_code(self) -> str:
        assert self.headers.get("content-type") == "application/json", (self.headers, self.body)
        return str(orjson.loads(self.body)["error"]["code"])


def h2_request(
    stack: Stack,
    path: str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    method: str = "POST",
    declare_length: bool = False,
    trailers: Mapping[str, str] | None = None,
    timeout: float = 10,
) -> Answer:
    """One request on a new connection; pseudo-headers in ``headers`` replace the defaults."""
    parts = urlsplit(stack.url)
    assert parts.hostname and parts.port
    fields = list(headers.items() if isinstance(headers, Mapping) else headers)
    pseudo = {":method": method, ":path": path, ":scheme": "http", ":authority": parts.netloc}
    pseudo.update((name, value) for name, value in fields if name.startswith(":"))
    request = [*pseudo.items(), *((n, v) for n, v in fields if not n.startswith(":"))]
    if declare_length:
        request.append(("content-length", str(len(body))))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    answer = Answer(0, {}, b"")
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        conn.initiate_connection()
        conn.send_headers(1, request, end_stream=not body and not trailers)
        offset, sent = 0, not body and not trailers  # sent: all of body and trailers
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (
            answer.reset is not None or ("end_stream" in answer.events and sent)
        ):
            # Send what flow control allows, then read whatever the server says.
            with contextlib.suppress(h2.exceptions.ProtocolError):  # e.g. the stream is closed
                while offset < len(body) and conn.local_flow_control_window(1) > 0:
                    size = min(
                        conn.local_flow_control_window(1),
                        conn.max_outbound_frame_size,
                        len(body) - offset,
                    )
                    end = offset + size == len(body) and not trailers
                    conn.send_data(1, body[offset : offset + size], end_stream=end)
                    offset += size
                if offset == len(body) and not sent:
                    if trailers:
                        conn.send_headers(1, list(trailers.items()), end_stream=True)
                    sent = True
            with contextlib.suppress(OSError):
                sock.sendall(conn.data_to_send())
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    got = {k.decode(): v.decode() for k, v in event.headers}
                    answer.status = int(got.pop(":status"))
                    answer.headers = got
                    answer.events.append("headers")
                elif isinstance(event, h2.events.DataReceived):
                    answer.body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    answer.events.append("end_stream")
                elif isinstance(event, h2.events.StreamReset):
                    code = event.error_code
                    answer.reset = int(code)
                    name = code.name if isinstance(code, h2.errors.ErrorCodes) else code
                    answer.events.append(f"rst_stream({name})")
            with contextlib.suppress(OSError):
                sock.sendall(conn.data_to_send())
    return answer
