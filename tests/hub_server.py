"""A small Hugging Face Hub-compatible HTTP server for tests: real huggingface_hub clients talk to it.

Repos live on disk (one JSON file of branches and commits per repo, blobs stored by hash). It
speaks the subset of the Hub API that huggingface_hub 2.x uses to create repos, commit (regular
files inline, LFS files through the batch API), list and download files:

    POST /api/repos/create                         POST /api/validate-yaml
    GET  /api/models/{id}[/revision/{rev}]         GET  /api/models/{id}/tree/{rev}[/{path}]
    POST /api/models/{id}/preupload/{rev}          POST /api/models/{id}/commit/{rev}
    POST /api/models/{id}/branch/{branch}          POST /{id}.git/info/lfs/objects/batch
    PUT  /lfs/{oid}  POST /lfs/verify              HEAD|GET /{id}/resolve/{rev}/{path}
    GET  /api/whoami-v2                            DELETE /api/repos/delete
    DELETE /api/models/{id}/branch/{branch}

Errors answer as the Hub does (status and X-Error-Code), so huggingface_hub raises its own
RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError and EntryNotFoundError. Commits
carry deletions (deletedFile, deletedFolder) as well as files. validate-yaml refuses card metadata
as the Hub does: `datasets` entries that are not dataset ids (the Hub's wording, as quoted in
huggingface/autotrain-advanced#648) and a `base_model` that is not a model on this server (worded
alike). A repo can be marked gated (downloads refused); the server can drop connections while
receiving commits, to test interrupted pushes, or refuse commits (refuse_commits: the message, as a
403). Every request is recorded (method, path, headers) for assertions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".png", ".jpg")
LFS_POINTER_SIZE = 134


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStore:
    """Repos on disk: repos/{org}/{name}.json holds branches and commits; blobs/{hash} the contents."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "repos").mkdir(parents=True, exist_ok=True)
        (root / "blobs").mkdir(exist_ok=True)
        self.lock = threading.Lock()

    def _path(self, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_id}.json"

    def load(self, repo_id: str) -> dict | None:
        path = self._path(repo_id)
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self, repo_id: str, repo: dict) -> None:
        path = self._path(repo_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(repo))
        partial.replace(path)

    def create(self, repo_id: str, private: bool = False, gated: bool = False) -> bool:
        with self.lock:
            if self.load(repo_id) is not None:
                return False
            sha = secrets.token_hex(20)
            self.save(repo_id, {"private": private, "gated": gated, "branches": {"main": sha},
                                "commits": {sha: {"parent": None, "message": "initial commit", "files": {}}}})
            return True

    def delete(self, repo_id: str) -> bool:
        with self.lock:
            path = self._path(repo_id)
            if not path.is_file():
                return False
            path.unlink()
            return True

    def resolve(self, repo: dict, revision: str) -> str | None:
        revision = unquote(revision)
        if revision in repo["branches"]:
            return repo["branches"][revision]
        return revision if revision in repo["commits"] else None

    def put_blob(self, key: str, data: bytes) -> None:
        (self.root / "blobs" / key).write_bytes(data)

    def has_blob(self, key: str) -> bool:
        return (self.root / "blobs" / key).is_file()

    def blob(self, key: str) -> bytes:
        return (self.root / "blobs" / key).read_bytes()

    def commit(self, repo_id: str, branch: str, message: str, added: dict[str, dict], deleted: list[str],
               parent: str | None) -> str:
        with self.lock:
            repo = self.load(repo_id)
            head = repo["branches"][branch]
            if parent is not None and parent != head:
                raise ValueError("parent commit is not the branch head")
            files = dict(repo["commits"][head]["files"])
            for path in deleted:
                files = {p: f for p, f in files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
            files.update(added)
            sha = secrets.token_hex(20)
            repo["commits"][sha] = {"parent": head, "message": message, "files": files}
            repo["branches"][branch] = sha
            self.save(repo_id, repo)
            return sha

    def upload(self, repo_id: str, files: dict[str, bytes], message: str = "upload", branch: str = "main") -> str:
        """Commit files directly (to set up source repos for tests)."""
        added = {}
        for path, data in files.items():
            if path.endswith(LFS_SUFFIXES):
                key = hashlib.sha256(data).hexdigest()
                added[path] = {"blob": key, "size": len(data), "oid": git_sha1(data), "lfs": key}
            else:
                key = git_sha1(data)
                added[path] = {"blob": key, "size": len(data), "oid": key, "lfs": None}
            self.put_blob(key, data)
        return self.commit(repo_id, branch, message, added, [], None)


REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?")


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format, *args) -> None:  # quiet
        pass

    # --- plumbing -------------------------------------------------------------------------------
    def _record(self) -> None:
        self.server.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers)})

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _repo(self, repo_id: str, for_download: bool = False) -> dict | None:
        repo = self.server.store.load(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if for_download and repo["gated"]:
            self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it "
                                           "and be authenticated to access it. Please log in.")
            return None
        return repo

    def _commit(self, repo_id: str, repo: dict, revision: str):
        sha = self.server.store.resolve(repo, revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}")
            return None, None
        return sha, repo["commits"][sha]

    def _route(self, routes) -> None:
        self._record()
        path = urlparse(self.path).path
        for pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match:
                return handler(**match.groupdict())
        self._error(404, "EntryNotFound", f"no route {self.command} {path}")

    def do_GET(self) -> None:
        self._route([
            (r"/api/whoami-v2", self.whoami),
            (rf"/api/models/{REPO}(?:/revision/(?P<revision>[^/]+))?", self.model_info),
            (rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)(?:/(?P<subpath>.*))?", self.tree),
            (rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<filename>.+)", self.resolve),
        ])

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self._route([
            (r"/api/repos/create", self.create_repo),
            (r"/api/validate-yaml", self.validate_yaml),
            (rf"/api/models/{REPO}/preupload/(?P<revision>[^/]+)", self.preupload),
            (rf"/api/models/{REPO}/commit/(?P<revision>[^/]+)", self.commit),
            (rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", self.create_branch),
            (rf"/{REPO}\.git/info/lfs/objects/batch", self.lfs_batch),
            (r"/lfs/verify", self.lfs_verify),
        ])

    def do_DELETE(self) -> None:
        self._route([
            (r"/api/repos/delete", self.delete_repo),
            (rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", self.delete_branch),
        ])

    def do_PUT(self) -> None:
        self._route([(r"/lfs/(?P<oid>[0-9a-f]{64})", self.lfs_upload)])

    # --- endpoints ------------------------------------------------------------------------------
    def whoami(self) -> None:
        if not self.headers.get("Authorization"):
            return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
        self._json(200, {"type": "user", "name": "tester", "orgs": []})

    def create_repo(self) -> None:
        body = json.loads(self._body())
        repo_id = f"{body.get('organization') or 'tester'}/{body['name']}"
        url = f"{self.server.url}/{repo_id}"
        if not self.server.store.create(repo_id, private=body.get("visibility") == "private"):
            return self._json(409, {"error": "You already created this model repo", "url": url})
        self._json(200, {"url": url, "name": repo_id})

    def delete_repo(self) -> None:
        body = json.loads(self._body())
        if not self.server.store.delete(f"{body.get('organization') or 'tester'}/{body['name']}"):
            return self._error(404, "RepoNotFound", "Repository not found")
        self._send(200)

    def validate_yaml(self) -> None:
        content = json.loads(self._body())["content"]
        metadata = None
        if content.startswith("---"):
            try:
                metadata = yaml.safe_load(content[3:].split("\n---", 1)[0])
                if not (metadata is None or isinstance(metadata, dict)):
                    raise yaml.YAMLError("the metadata is not a mapping")
            except yaml.YAMLError as error:
                return self._json(400, {"errors": [{"message": f"invalid YAML: {error}"}], "warnings": []})
        errors = []
        for key, value in (metadata or {}).items():
            if key not in ("base_model", "datasets"):
                continue
            for index, item in enumerate(value if isinstance(value, list) else [value]):
                name = f'"{key}[{index}]"' if isinstance(value, list) else f'"{key}"'
                if key == "datasets" and not DATASET_ID.fullmatch(str(item)):
                    errors.append(f'{name} with value "{item}" is not valid. If possible, use a dataset id from '
                                  "https://hf.co/datasets.")
                if key == "base_model" and self.server.store.load(str(item)) is None:
                    errors.append(f'{name} with value "{item}" is not valid. Use a model id from https://hf.co/models.')
        if errors:
            return self._json(400, {"errors": [{"message": message} for message in errors], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def model_info(self, repo: str, revision: str | None = None) -> None:
        data = self._repo(repo)
        if data is None:
            return
        sha, commit = self._commit(repo, data, revision or "main")
        if sha is None:
            return
        with_blobs = "blobs" in parse_qs(urlparse(self.path).query)
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            sibling = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    sibling["lfs"] = {"sha256": entry["lfs"], "size": entry["size"], "pointerSize": LFS_POINTER_SIZE}
            siblings.append(sibling)
        self._json(200, {"id": repo, "modelId": repo, "sha": sha, "private": data["private"],
                         "gated": "manual" if data["gated"] else False, "disabled": False, "siblings": siblings,
                         "tags": [], "downloads": 0, "likes": 0, "lastModified": "2026-01-01T00:00:00.000Z"})

    def tree(self, repo: str, revision: str, subpath: str | None = None) -> None:
        data = self._repo(repo)
        if data is None:
            return
        sha, commit = self._commit(repo, data, revision)
        if sha is None:
            return
        prefix = (unquote(subpath).rstrip("/") + "/") if subpath else ""
        entries, folders = [], set()
        for path, entry in sorted(commit["files"].items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                folders.add(prefix + "/".join(parts[:depth]))
            item = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
            if entry["lfs"]:
                item["lfs"] = {"oid": entry["lfs"], "size": entry["size"], "pointerSize": LFS_POINTER_SIZE}
            entries.append(item)
        entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                    for f in sorted(folders)]
        self._json(200, entries)

    def resolve(self, repo: str, revision: str, filename: str) -> None:
        data = self._repo(repo, for_download=True)
        if data is None:
            return
        sha, commit = self._commit(repo, data, revision)
        if sha is None:
            return
        entry = commit["files"].get(unquote(filename))
        if entry is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}")
        content = self.server.store.blob(entry["blob"])
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["lfs"]}"', "X-Linked-Size": str(entry["size"])})
        status, ranged = 200, self.headers.get("Range")
        if ranged and ranged.startswith("bytes="):
            first, _, last = ranged[6:].partition("-")
            start, end = int(first), min(int(last or len(content) - 1), len(content) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start : end + 1], 206
        self._send(status, content, headers, content_type="application/octet-stream")

    def preupload(self, repo: str, revision: str) -> None:
        data = self._repo(repo)
        if data is None:
            return
        sha, commit = self._commit(repo, data, revision)
        if sha is None:
            return
        answers = []
        for file in json.loads(self._body())["files"]:
            lfs = file["path"].endswith(LFS_SUFFIXES) or file["size"] >= 10 * 1024 * 1024
            existing = commit["files"].get(file["path"])
            oid = None
            if existing is not None and bool(existing["lfs"]) == lfs:
                oid = existing["lfs"] if lfs else existing["oid"]
            answers.append({"path": file["path"], "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": answers, "commitOid": sha})

    def lfs_batch(self, repo: str) -> None:
        if self._repo(repo) is None:
            return
        objects = []
        for item in json.loads(self._body())["objects"]:
            answer = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if not self.server.store.has_blob(item["oid"]):
                answer["actions"] = {"upload": {"href": f"{self.server.url}/lfs/{item['oid']}", "header": {}},
                                     "verify": {"href": f"{self.server.url}/lfs/verify", "header": {}}}
            objects.append(answer)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._json(400, {"error": "sha256 mismatch"})
        self.server.store.put_blob(oid, data)
        self._send(200)

    def lfs_verify(self) -> None:
        item = json.loads(self._body())
        if not self.server.store.has_blob(item["oid"]):
            return self._json(404, {"error": "object not uploaded"})
        self._json(200, {"success": True})

    def commit(self, repo: str, revision: str) -> None:
        data = self._repo(repo)
        if data is None:
            return
        branch = unquote(revision)
        if branch not in data["branches"]:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        if self.server.refuse_commits:
            self._body()
            return self._error(403, "Forbidden", self.server.refuse_commits)
        if self.server.drop_commits:
            # read part of the request, then hang up without answering: an interrupted upload
            self.rfile.read(min(int(self.headers.get("Content-Length") or 0), 512))
            self.close_connection = True
            self.connection.shutdown(2)
            return
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        added, deleted = {}, []
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                content = base64.b64decode(value["content"])
                key = git_sha1(content)
                self.server.store.put_blob(key, content)
                added[value["path"]] = {"blob": key, "size": len(content), "oid": key, "lfs": None}
            elif line["key"] == "lfsFile":
                if not self.server.store.has_blob(value["oid"]):
                    return self._json(422, {"error": f"LFS object {value['oid']} was not uploaded"})
                content = self.server.store.blob(value["oid"])
                added[value["path"]] = {"blob": value["oid"], "size": value["size"], "oid": git_sha1(content),
                                        "lfs": value["oid"]}
            elif line["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
        try:
            sha = self.server.store.commit(repo, branch, header["summary"], added, deleted,
                                           header.get("parentCommit"))
        except ValueError as error:
            return self._json(412, {"error": str(error)})
        self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.server.url}/{repo}/commit/{sha}",
                         "pullRequestUrl": None})

    def delete_branch(self, repo: str, branch: str) -> None:
        branch = unquote(branch)
        with self.server.store.lock:
            data = self.server.store.load(repo)
            if data is None or branch not in data["branches"] or branch == "main":
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
            del data["branches"][branch]
            self.server.store.save(repo, data)
        self._send(200)

    def create_branch(self, repo: str, branch: str) -> None:
        data = self._repo(repo)
        if data is None:
            return
        branch = unquote(branch)
        if branch in data["branches"]:
            return self._json(409, {"error": "Reference already exists"})
        body = json.loads(self._body() or b"{}")
        with self.server.store.lock:
            data = self.server.store.load(repo)
            data["branches"][branch] = self.server.store.resolve(data, body.get("startingPoint", "main"))
            self.server.store.save(repo, data)
        self._json(200, {})


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.store = HubStore(root)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests: list[dict] = []
        self.drop_commits = False
        self.refuse_commits: str | None = None

    def start(self) -> HubServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self
