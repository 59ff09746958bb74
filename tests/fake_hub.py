"""A minimal local stand-in for the Hugging Face Hub's HTTP API, serving one folder as one repo,
so that `huggingface_hub.snapshot_download` itself lays out a real cache (no network)."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def serve_repo(repo_id: str, folder: Path) -> tuple[Any, str]:
    """Start serving `folder` as the model repo `repo_id`; returns (server, endpoint URL)."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    sha = hashlib.sha1(b"".join(files.values())).hexdigest()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(200)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            api, resolve = f"/api/models/{repo_id}", f"/{repo_id}/resolve/"
            if path.startswith(api + "/tree/"):
                tree = [{"type": "file", "path": k, "size": len(v), "oid": hashlib.sha1(v).hexdigest()}
                        for k, v in files.items()]
                return self._reply(json.dumps(tree).encode(), {"Content-Type": "application/json"})
            if path.startswith(api):
                info = {"id": repo_id, "sha": sha, "siblings": [{"rfilename": k} for k in files]}
                return self._reply(json.dumps(info).encode(), {"Content-Type": "application/json"})
            if path.startswith(resolve) and path[len(resolve):].split("/", 1)[-1] in files:
                body = files[path[len(resolve):].split("/", 1)[1]]
                return self._reply(body, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'})
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
