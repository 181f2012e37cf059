"""A small real HTTP server speaking the OpenAI completions API, with faults chosen by the
request's model name, for tests/system/test_expert_endpoint.py. Run as a process:
`python openai_fault_server.py PORT`. Models:
  ok        answers "Q:<a><op><b>\\nA:" with the arithmetic result
  429xN     the first N requests get 429 (Retry-After: 0), then answers
  500       always 500
  400       always 400
  slow      answers after 30 s
GET /hits returns {model: requests seen}; the Authorization header of the last request is kept in
/hits under "auth" (so a test can check the key arrived, without the test printing it)."""
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HITS: dict = {}
LOCK = threading.Lock()


def answer(prompt: str) -> str:
    m = re.search(r"Q:(\d+)([-+*])(\d+)", prompt)
    if not m:
        return "?"
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return str(a * b if op == "*" else a + b if op == "+" else a - b)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        with LOCK:
            self._send(200, dict(HITS))

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        model = req.get("model", "")
        with LOCK:
            n = HITS[model] = HITS.get(model, 0) + 1
            HITS["auth"] = self.headers.get("authorization", "")
        err = {"error": {"message": f"fault {model}", "type": "fault", "code": None}}
        if model.startswith("429x") and n <= int(model[4:]):
            return self._send(429, err, {"retry-after": "0"})
        if model in ("500", "400"):
            return self._send(int(model), err)
        if model == "slow":
            time.sleep(30)
        text = answer(req.get("prompt", ""))
        self._send(200, {"id": "x", "object": "text_completion", "created": 0, "model": model,
                         "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}]})


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()
