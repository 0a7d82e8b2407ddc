"""A tiny, in-memory, Hub-compatible HTTP server for tests: just enough of the Hub API for `huggingface_hub`'s client.

It serves the routes the real client calls for a model repo push and pull, with the response shapes and headers the
client reads (see `huggingface_hub/_commit_api.py`, `hf_api.py` and `file_download.py`):

- `POST /api/repos/create`                                  -> `HfApi.create_repo`
- `POST /api/validate-yaml`                                 -> `HfApi.create_commit` (when README.md is committed)
- `POST /api/models/{repo_id}/preupload/{revision}`         -> upload mode per file: always "regular" (no LFS, no Xet)
- `POST /api/models/{repo_id}/commit/{revision}`            -> ndjson commit, `?create_pr=1` opens a `refs/pr/N` branch
- `POST /api/models/{repo_id}/branch/{branch}`              -> `HfApi.create_branch`
- `GET  /api/models/{repo_id}[/revision/{revision}]`        -> `HfApi.model_info` / `repo_info`
- `HEAD|GET /{repo_id}/resolve/{revision}/{path}`           -> `hf_hub_download`, `file_exists` (X-Repo-Commit, ETag)

Anything else answers 404 and is recorded in `unhandled`, so a test can assert the client needed nothing more.
`validate-yaml` only checks that the metadata block parses to a mapping: it is not the Hub's schema validation.

The server binds 127.0.0.1 on a free port, caps request bodies, and runs in a daemon thread:

    with LocalHub(token="hf_test") as hub:
        os.environ["HF_ENDPOINT"] = hub.endpoint  # for a subprocess; or HfApi(endpoint=hub.endpoint)
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

MAX_BODY_BYTES = 64 * 1024 * 1024  # far above a prompt adapter; refuse anything bigger rather than buffer it
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob, which the Hub returns as the ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    message: str
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # "main", "my-branch", "refs/pr/1" -> commit oid
    num_prs: int = 0

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        return self.commits.get(revision)

    def commit(self, ref: str, files: dict[str, bytes], deleted: set[str], message: str) -> Commit:
        parent = self.commits[self.refs[ref]] if ref in self.refs else None
        tree = {path: data for path, data in (parent.files if parent else {}).items() if path not in deleted}
        tree.update(files)
        seed = json.dumps([parent.oid if parent else None, message, sorted(tree)]).encode()
        oid = hashlib.sha1(seed + b"".join(tree[p] for p in sorted(tree))).hexdigest()
        self.commits[oid] = Commit(oid=oid, files=tree, message=message, parent=parent.oid if parent else None)
        self.refs[ref] = oid
        return self.commits[oid]


class LocalHub:
    """An in-memory Hub on 127.0.0.1. Use as a context manager; `requests` logs `(method, path)` of every call."""

    def __init__(self, token: str = "hf_local_test_token"):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LocalHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of `repo_id` at `revision` (a branch, `refs/pr/N`, or a commit oid), for assertions."""
        commit = self.repos[repo_id].resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id} has no revision {revision!r}")
        return dict(commit.files)


def _make_handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - keep pytest output clean
            pass

        # ---- plumbing -------------------------------------------------------------------------------------------

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, payload: dict, headers: dict[str, str] | None = None, head: bool = False):
            headers = {"Content-Type": "application/json", **(headers or {})}
            self._send(status, json.dumps(payload).encode(), headers, head=head)

        def _error(self, status: int, code: str, message: str, head: bool = False, headers: dict | None = None):
            # huggingface_hub maps X-Error-Code to its typed errors (RepositoryNotFoundError, RevisionNotFoundError...).
            headers = {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})}
            self._json(status, {"error": message}, headers, head=head)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                self.close_connection = True  # the unread body makes this connection unusable
                raise ValueError(f"request body of {length} bytes is over the {MAX_BODY_BYTES} bytes limit")
            return self.rfile.read(length)

        def _authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _readable(self, repo: Repo | None) -> bool:
            # Like the Hub: a private repo is "not found" to anyone without the token.
            return repo is not None and (not repo.private or self._authorized())

        def _dispatch(self, method: str):
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            with hub._lock:
                hub.requests.append((method, path))
            try:
                # Always drain the body first: a keep-alive connection would otherwise read it as the next request.
                self.body = self._body() if method == "POST" else b""
                handled = self._route(method, path, query)
            except (ValueError, KeyError, json.JSONDecodeError) as error:
                self._error(400, "BadRequest", f"bad request: {error}")
                return
            if not handled:
                with hub._lock:
                    hub.unhandled.append((method, path))
                self._error(404, "NotFound", f"local hub has no route for {method} {path}", head=method == "HEAD")

        def do_GET(self):  # noqa: N802
            self._dispatch("GET")

        def do_HEAD(self):  # noqa: N802
            self._dispatch("HEAD")

        def do_POST(self):  # noqa: N802
            self._dispatch("POST")

        # ---- routes ---------------------------------------------------------------------------------------------

        def _route(self, method: str, path: str, query: dict) -> bool:
            if method == "POST" and path == "/api/repos/create":
                self._create_repo(json.loads(self.body))
                return True
            if method == "POST" and path == "/api/validate-yaml":
                self._validate_yaml(json.loads(self.body))
                return True
            if path.startswith("/api/models/"):
                return self._model_api(method, path.removeprefix("/api/models/"), query)
            if method in ("GET", "HEAD") and "/resolve/" in path:
                repo_id, _, rest = path.lstrip("/").partition("/resolve/")
                self._resolve(repo_id, rest, head=method == "HEAD")
                return True
            return False

        def _create_repo(self, payload: dict):
            if not self._authorized():
                self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                return
            repo_id = (
                f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            )
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            with hub._lock:
                if repo_id in hub.repos:
                    # The Hub's 409 body carries the repo url, which `create_repo(exist_ok=True)` returns.
                    headers = {"X-Error-Message": "You already created this model repo"}
                    self._json(
                        409,
                        {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"},
                        headers,
                    )
                    return
                repo = Repo(repo_id=repo_id, private=private)
                repo.commit("main", {".gitattributes": GITATTRIBUTES}, set(), "initial commit")
                hub.repos[repo_id] = repo
            self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

        def _validate_yaml(self, payload: dict):
            content = payload.get("content", "")
            errors = []
            if content.startswith("---"):
                block = content.split("---", 2)[1] if content.count("---") >= 2 else ""
                try:
                    metadata = yaml.safe_load(block)
                    if metadata is not None and not isinstance(metadata, dict):
                        errors.append({"message": "metadata block is not a mapping"})
                except yaml.YAMLError as error:
                    errors.append({"message": f"metadata block is not valid YAML: {error}"})
            self._json(400 if errors else 200, {"errors": errors, "warnings": []})

        def _model_api(self, method: str, rest: str, query: dict) -> bool:
            parts = rest.split("/")
            repo_id, action, revision = "/".join(parts[:2]), (parts[2] if len(parts) > 2 else ""), "/".join(parts[3:])
            repo = hub.repos.get(repo_id)
            if not self._readable(repo):
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return True
            if method == "GET" and action in ("", "revision"):
                self._model_info(repo, revision or "main")
                return True
            if method != "POST":
                return False
            if not self._authorized():
                self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                return True
            if action == "preupload":
                files = json.loads(self.body)["files"]
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                self._json(200, {"files": modes})
                return True
            if action == "commit":
                self._commit(repo, revision, create_pr=query.get("create_pr") == ["1"])
                return True
            if action == "branch":
                self._create_branch(repo, revision, json.loads(self.body or b"{}"))
                return True
            return False

        def _model_info(self, repo: Repo, revision: str):
            commit = repo.resolve(revision)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return
            siblings = [{"rfilename": name} for name in sorted(commit.files)]
            self._json(200, {"id": repo.repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings})

        def _commit(self, repo: Repo, revision: str, create_pr: bool):
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files, deleted = {}, set()
            for line in lines:
                if line["key"] == "file":
                    files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                elif line["key"] in ("deletedFile", "deletedFolder"):
                    deleted.add(line["value"]["path"])
                elif line["key"] == "lfsFile":
                    # Preupload never answers "lfs", so an LFS pointer here would be a client/server mismatch.
                    raise ValueError(f"unexpected LFS file {line['value']['path']}")
            with hub._lock:
                base = repo.resolve(revision)
                if base is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    return
                pr_url = None
                ref = revision
                if create_pr:
                    repo.num_prs += 1
                    ref = f"refs/pr/{repo.num_prs}"
                    repo.refs[ref] = base.oid
                    pr_url = f"{hub.endpoint}/{repo.repo_id}/discussions/{repo.num_prs}"
                commit = repo.commit(ref, files, deleted, header["summary"])
            self._json(
                200,
                {
                    "commitUrl": f"{hub.endpoint}/{repo.repo_id}/commit/{commit.oid}",
                    "commitOid": commit.oid,
                    "pullRequestUrl": pr_url,
                },
            )

        def _create_branch(self, repo: Repo, branch: str, payload: dict):
            with hub._lock:
                if branch in repo.refs:
                    self._error(409, "Conflict", f"Branch {branch} already exists")
                    return
                start = repo.resolve(payload.get("startingPoint") or "main")
                if start is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {payload.get('startingPoint')}")
                    return
                repo.refs[branch] = start.oid
            self._json(200, {})

        def _resolve(self, repo_id: str, rest: str, head: bool):
            repo = hub.repos.get(repo_id)
            if not self._readable(repo):
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
                return
            # The revision may itself contain slashes ("refs/pr/1"): take the longest prefix that resolves.
            segments = rest.split("/")
            for cut in range(len(segments) - 1, 0, -1):
                commit = repo.resolve("/".join(segments[:cut]))
                if commit is not None:
                    filename = "/".join(segments[cut:])
                    break
            else:
                self._error(404, "RevisionNotFound", f"Invalid rev id in {rest}", head=head)
                return
            if filename not in commit.files:
                headers = {"X-Repo-Commit": commit.oid}
                self._error(404, "EntryNotFound", f"{filename} does not exist", head=head, headers=headers)
                return
            content = commit.files[filename]
            headers = {
                "X-Repo-Commit": commit.oid,
                "ETag": f'"{git_blob_sha1(content)}"',
                "Content-Type": "application/octet-stream",
            }
            self._send(200, content, headers, head=head)

    return Handler
