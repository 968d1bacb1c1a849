"""A tiny OpenAI chat-completions server on 127.0.0.1 (a free port) for the real-HTTP tests of the LLM layer.

POST /v1/chat/completions is answered per ``plan`` (actions consumed in order; the last one repeats):
("ok", text) | ("status", code) | ("sleep", seconds) | ("responder", fn) — fn(messages) -> the reply text.
Nothing but 127.0.0.1 is ever bound or reached.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(text: str, body: dict) -> dict:
    prompt = sum(len(m["content"].split()) for m in body.get("messages", []))
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": len(text.split()),
                      "total_tokens": prompt + len(text.split())}}


class LocalOpenAIServer:
    def __init__(self) -> None:
        self.plan: list[tuple] = [("ok", "hello")]
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with outer._lock:
                    outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    action = outer.plan.pop(0) if len(outer.plan) > 1 else outer.plan[0]
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "no such route"}})
                if action[0] == "status":
                    return self._send(action[1], {"error": {"message": f"planned {action[1]}", "type": "test"}})
                if action[0] == "sleep":
                    time.sleep(action[1])
                    return self._send(200, completion("too late", body))
                if action[0] == "responder":
                    return self._send(200, completion(action[1](body["messages"]), body))
                return self._send(200, completion(action[1], body))

            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
