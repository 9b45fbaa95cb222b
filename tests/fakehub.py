""" A fake Hugging Face Hub on a real local socket, for tests that must never reach the network.

It serves the requests huggingface_hub (2.x, with HF_HUB_DISABLE_XET=1) sends to create a repo, a
branch, commit files (NDJSON commit, regular files inline, LFS files through the batch API), read
repo info and download files (`resolve/{revision}/{filename}` with the Hub's ETag headers).
Repos live in memory as commits of whole file trees. `fake_hub` is the pytest fixture.
"""
import base64
import fnmatch
import hashlib
import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

import pytest
import yaml

FAKE_TOKEN = 'hf_FakeTokenForTests0123456789abcdef'
LFS_PATTERNS = ('*.safetensors', '*.bin', '*.pth', '*.pt', '*.tar')
GITATTRIBUTES = ''.join(f'{p} filter=lfs diff=lfs merge=lfs -text\n' for p in LFS_PATTERNS).encode()


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """What the Hub reports as the file's id: sha256 for LFS files, git blob sha1 otherwise."""
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_sha1(self.data)


@dataclass
class Commit:
    sha: str
    message: str
    tree: Dict[str, Blob]
    changed: Tuple[str, ...]


@dataclass
class Repo:
    private: bool
    branches: Dict[str, str] = field(default_factory=dict)
    commits: Dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Optional[Commit]:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)

    def commit(self, branch: str, message: str, tree: Dict[str, Blob], changed) -> Commit:
        sha = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
        self.commits[sha] = Commit(sha, message, tree, tuple(sorted(changed)))
        self.branches[branch] = sha
        return self.commits[sha]


class HubError(Exception):
    """An error reply: status, X-Error-Code (what huggingface_hub maps to its error classes), extra headers/body."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, headers=None, body=None):
        super().__init__(message)
        self.status, self.code, self.headers, self.body = status, code, headers or {}, body or {}


class FakeHub:
    """In-memory Hub served on 127.0.0.1; `requests` logs every (method, path) it received."""

    def __init__(self, token: str = FAKE_TOKEN):
        self.token = token
        self.repos: Dict[str, Repo] = {}
        self.lfs: Dict[str, bytes] = {}
        self.requests: List[Tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(('127.0.0.1', 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> 'FakeHub':
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, revision: str = 'main') -> Dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        return {path: blob.data for path, blob in commit.tree.items()}

    def history(self, repo_id: str) -> List[Commit]:
        return list(self.repos[repo_id].commits.values())

    # --- endpoints -------------------------------------------------------------------------------------------------

    def create_repo(self, body: dict) -> dict:
        if not body.get('organization'):
            raise HubError(400, 'A namespace is required')
        repo_id = f"{body['organization']}/{body['name']}"
        url = f'{self.url}/{repo_id}'
        if repo_id in self.repos:
            raise HubError(409, 'You already created this model repo', body={'url': url})
        repo = Repo(private=body.get('visibility') == 'private')
        repo.commit('main', 'initial commit', {'.gitattributes': Blob(GITATTRIBUTES, False)}, ['.gitattributes'])
        self.repos[repo_id] = repo
        return {'url': url, 'name': repo_id}

    def validate_yaml(self, body: dict) -> dict:
        content = body.get('content', '')
        if content.startswith('---\n'):
            try:
                yaml.safe_load(content[4:content.index('\n---', 3)])
            except (ValueError, yaml.YAMLError) as e:
                raise HubError(400, 'Invalid YAML', body={'errors': [{'message': str(e)}]})
        return {'errors': [], 'warnings': []}

    def create_branch(self, repo: Repo, branch: str, body: dict) -> dict:
        if branch in repo.branches:
            raise HubError(409, f'Branch {branch} already exists')
        start = repo.resolve(body.get('startingPoint') or 'main')
        repo.branches[branch] = start.sha
        return {}

    def preupload(self, repo: Repo, revision: str, body: dict) -> dict:
        commit = self._commit_of(repo, revision)
        files = []
        for f in body['files']:
            lfs = any(fnmatch.fnmatch(f['path'], p) for p in LFS_PATTERNS) or f['size'] > 10_000_000
            existing = commit.tree.get(f['path'])
            files.append(dict(
                path=f['path'], uploadMode='lfs' if lfs else 'regular', shouldIgnore=False,
                oid=existing.oid if existing else None,
            ))
        return {'files': files, 'commitOid': commit.sha}

    def lfs_batch(self, body: dict) -> dict:
        objects = []
        for obj in body['objects']:
            out = dict(oid=obj['oid'], size=obj['size'], authenticated=True)
            if obj['oid'] not in self.lfs:
                out['actions'] = {
                    'upload': {'href': f"{self.url}/lfs-upload/{obj['oid']}"},
                    'verify': {'href': f'{self.url}/lfs-verify'},
                }
            objects.append(out)
        return {'transfer': 'basic', 'objects': objects}

    def lfs_upload(self, oid: str, data: bytes) -> dict:
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, 'sha256 does not match the LFS oid')
        self.lfs[oid] = data
        return {}

    def lfs_verify(self, body: dict) -> dict:
        if len(self.lfs.get(body['oid'], b'')) != body['size'] or body['oid'] not in self.lfs:
            raise HubError(404, 'LFS object not found')
        return {}

    def commit(self, repo_id: str, repo: Repo, revision: str, lines: List[dict]) -> dict:
        parent = self._commit_of(repo, revision)
        header = lines[0]['value']
        if header.get('parentCommit') not in (None, parent.sha):
            raise HubError(412, 'Parent commit is not the head of the branch')
        tree, changed = dict(parent.tree), []
        for line in lines[1:]:
            key, value = line['key'], line['value']
            if key == 'file':
                tree[value['path']] = Blob(base64.b64decode(value['content']), False)
            elif key == 'lfsFile':
                if value['oid'] not in self.lfs:
                    raise HubError(422, f"LFS object {value['oid']} was never uploaded")
                tree[value['path']] = Blob(self.lfs[value['oid']], True)
            elif key == 'deletedFile':
                tree.pop(value['path'])
            else:
                raise HubError(400, f'Unsupported commit operation {key}')
            changed.append(value['path'])
        commit = repo.commit(revision, header['summary'], tree, changed)
        return {'commitUrl': f'{self.url}/{repo_id}/commit/{commit.sha}', 'commitOid': commit.sha, 'success': True}

    def repo_info(self, repo_id: str, repo: Repo, revision: str) -> dict:
        commit = self._commit_of(repo, revision)
        siblings = [{'rfilename': path} for path in sorted(commit.tree)]
        return {'id': repo_id, 'modelId': repo_id, 'sha': commit.sha, 'private': repo.private, 'siblings': siblings}

    def resolve(self, repo: Repo, revision: str, path: str) -> Tuple[Blob, dict]:
        commit = self._commit_of(repo, revision)
        if path not in commit.tree:
            raise HubError(404, 'Entry not found', 'EntryNotFound', {'X-Repo-Commit': commit.sha})
        blob = commit.tree[path]
        headers = {'X-Repo-Commit': commit.sha, 'Content-Length': str(len(blob.data))}
        if blob.lfs:
            pointer = f'version https://git-lfs.github.com/spec/v1\noid sha256:{blob.oid}\nsize {len(blob.data)}\n'
            headers.update({
                'ETag': f'"{git_sha1(pointer.encode())}"',
                'X-Linked-Etag': f'"{blob.oid}"',
                'X-Linked-Size': str(len(blob.data)),
            })
        else:
            headers['ETag'] = f'"{blob.oid}"'
        return blob, headers

    @staticmethod
    def _commit_of(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f'Invalid rev id: {revision}', 'RevisionNotFound')
        return commit


def _handler(hub: FakeHub):

    class Handler(BaseHTTPRequestHandler):

        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self):
            self._serve('HEAD')

        def do_GET(self):
            self._serve('GET')

        def do_POST(self):
            self._serve('POST')

        def do_PUT(self):
            self._serve('PUT')

        def _serve(self, method: str) -> None:
            raw_path = urlsplit(self.path).path
            body = self._body()
            with hub.lock:
                hub.requests.append((method, unquote(raw_path)))
                try:
                    status, headers, payload = self._route(method, [unquote(s) for s in raw_path.strip('/').split('/')],
                                                           body)
                except HubError as e:
                    headers = {'X-Error-Message': str(e), **({'X-Error-Code': e.code} if e.code else {}), **e.headers}
                    status, payload = e.status, json.dumps({'error': str(e), **e.body}).encode()
            self.send_response(status)
            headers.setdefault('Content-Length', str(len(payload)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if method != 'HEAD':
                self.wfile.write(payload)

        def _body(self) -> bytes:
            if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b';')[0], 16)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                    if size == 0:
                        return b''.join(chunks)
            return self.rfile.read(int(self.headers.get('Content-Length') or 0))

        def _authorized(self) -> bool:
            return self.headers.get('authorization') == f'Bearer {hub.token}'

        def _require_auth(self) -> None:
            if not self._authorized():
                raise HubError(401, 'Invalid credentials in Authorization header')

        def _repo(self, repo_id: str) -> Repo:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self._authorized()):
                raise HubError(404 if repo is None else 401, 'Repository not found', 'RepoNotFound')
            return repo

        def _route(self, method: str, parts: List[str], body: bytes):
            def reply(data: dict):
                return 200, {'Content-Type': 'application/json'}, json.dumps(data).encode()

            if method in ('POST', 'PUT') and parts[0] != 'lfs-upload':
                self._require_auth()
            if method == 'POST' and parts == ['api', 'repos', 'create']:
                return reply(hub.create_repo(json.loads(body)))
            if method == 'POST' and parts == ['api', 'validate-yaml']:
                return reply(hub.validate_yaml(json.loads(body)))
            if method == 'POST' and len(parts) == 6 and parts[:2] == ['api', 'models']:
                repo_id = '/'.join(parts[2:4])
                repo, action, rev = self._repo(repo_id), parts[4], parts[5]
                if action == 'preupload':
                    return reply(hub.preupload(repo, rev, json.loads(body)))
                if action == 'commit':
                    if 'create_pr' in urlsplit(self.path).query:
                        raise HubError(400, 'Pull requests are not supported by the fake Hub')
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    return reply(hub.commit(repo_id, repo, rev, lines))
                if action == 'branch':
                    return reply(hub.create_branch(repo, rev, json.loads(body or b'{}')))
            if method == 'POST' and parts[2:] == ['info', 'lfs', 'objects', 'batch'] and parts[1].endswith('.git'):
                self._repo(f'{parts[0]}/{parts[1][:-4]}')
                return reply(hub.lfs_batch(json.loads(body)))
            if method == 'PUT' and parts[0] == 'lfs-upload':
                return reply(hub.lfs_upload(parts[1], body))
            if method == 'POST' and parts == ['lfs-verify']:
                return reply(hub.lfs_verify(json.loads(body)))
            if method == 'GET' and parts[:2] == ['api', 'models'] and (len(parts) == 4 or parts[4:5] == ['revision']):
                repo_id = '/'.join(parts[2:4])
                return reply(hub.repo_info(repo_id, self._repo(repo_id), parts[5] if len(parts) == 6 else 'main'))
            if method in ('GET', 'HEAD') and len(parts) >= 5 and parts[2] == 'resolve':
                blob, headers = hub.resolve(self._repo('/'.join(parts[:2])), parts[3], '/'.join(parts[4:]))
                return 200, headers, blob.data
            raise HubError(404, f'The fake Hub has no endpoint {method} /{"/".join(parts)}')

    return Handler


def use_hub(monkeypatch: pytest.MonkeyPatch, endpoint: str, home, token: Optional[str]) -> None:
    """Point huggingface_hub at `endpoint`, with a private HF_HOME and `token` (None: logged out).

    huggingface_hub reads these settings once, at import, into `huggingface_hub.constants`: set both the
    environment (for subprocesses) and the constants (for this process).
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session

    settings = {
        'HF_ENDPOINT': endpoint, 'HF_HOME': str(home), 'HF_HUB_CACHE': str(home / 'hub'),
        'HF_TOKEN_PATH': str(home / 'token'), 'HF_HUB_DISABLE_TELEMETRY': '1', 'HF_HUB_DISABLE_XET': '1',
        'HF_HUB_OFFLINE': '0', 'NO_PROXY': '127.0.0.1,localhost',
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    for name in ('HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        monkeypatch.delenv(name, raising=False)
    if token is None:
        monkeypatch.delenv('HF_TOKEN', raising=False)
    else:
        monkeypatch.setenv('HF_TOKEN', token)
    constant_values = dict(
        ENDPOINT=endpoint, HUGGINGFACE_CO_URL_TEMPLATE=endpoint + '/{repo_id}/resolve/{revision}/{filename}',
        HF_HOME=str(home), HF_HUB_CACHE=str(home / 'hub'), HF_TOKEN_PATH=str(home / 'token'),
        HF_STORED_TOKENS_PATH=str(home / 'stored_tokens'), HF_HUB_DISABLE_TELEMETRY=True, HF_HUB_DISABLE_XET=True,
        HF_HUB_OFFLINE=False,
    )
    for name, value in constant_values.items():
        monkeypatch.setattr(constants, name, value)
    close_session()  # a new HTTP client, made under these settings


def set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool = True) -> None:
    from huggingface_hub import constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1' if offline else '0')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', offline)


def use_cache(monkeypatch: pytest.MonkeyPatch, path) -> None:
    """Switch huggingface_hub to another (e.g. empty) download cache."""
    from huggingface_hub import constants
    monkeypatch.setenv('HF_HUB_CACHE', str(path))
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(path))


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A running FakeHub that huggingface_hub talks to, logged in with FAKE_TOKEN, caching under tmp_path."""
    from huggingface_hub.utils import close_session

    with FakeHub() as hub:
        use_hub(monkeypatch, hub.url, tmp_path / 'hf_home', FAKE_TOKEN)
        yield hub
    close_session()
