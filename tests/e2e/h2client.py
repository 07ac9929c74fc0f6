"""A minimal HTTP/2 (h2c, prior knowledge) client that copes with early responses.

httpx gives up when a server answers (413) and resets the stream while the
client is still sending; real clients then read the answer, and so does this.
"""

from __future__ import annotations

import contextlib
import socket
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
import h2.exceptions


def h2_post(
    stack: object, path: str, body: bytes, declare_length: bool, headers: dict[str, str]
) -> tuple[int, bytes]:
    parts = urlsplit(stack.url)  # type: ignore[attr-defined]
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        request = [
            (":method", "POST"),
            (":path", path),
            (":scheme", "http"),
            (":authority", parts.netloc),
            *headers.items(),
        ]
        if declare_length:
            request.append(("content-length", str(len(body))))
        conn.send_headers(1, request)
        status, received, done, offset = 0, bytearray(), False, 0
        while not done:
            # Send what flow control allows, then read whatever the server says.
            with contextlib.suppress(h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
                while offset < len(body) and conn.local_flow_control_window(1) > 0:
                    size = min(
                        conn.local_flow_control_window(1),
                        conn.max_outbound_frame_size,
                        len(body) - offset,
                    )
                    conn.send_data(
                        1, body[offset : offset + size], end_stream=offset + size == len(body)
                    )
                    offset += size
            with contextlib.suppress(OSError):
                sock.sendall(conn.data_to_send())
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    received += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    done = True
            with contextlib.suppress(OSError):
                sock.sendall(conn.data_to_send())
    return status, bytes(received)
