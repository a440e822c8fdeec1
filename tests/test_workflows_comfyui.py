"""The example API workflows on a real ComfyUI server, through its HTTP API (headless, as a user would run them).

Skipped unless ``CSD_COMFYUI_ROOT`` points at a ComfyUI checkout; ``CSD_COMFYUI_PYTHON`` is the interpreter of its
environment (default: this one). That environment needs ComfyUI's requirements and this pack's requirements.txt.
The server is started on 127.0.0.1 on a free port with a temporary ``--base-directory`` (its models, custom_nodes,
output, input, temp and user folders) holding the tiny test model and this checkout under a unique folder name,
and only that pack loaded (``--disable-all-custom-nodes --whitelist-custom-nodes``). Whatever is installed in the
ComfyUI checkout (this pack included) is neither loaded nor listed. It is stopped at the end.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import pytest

import comfy_stubs as cs

COMFY_ROOT = os.environ.get("CSD_COMFYUI_ROOT", "")
COMFY_PYTHON = os.environ.get("CSD_COMFYUI_PYTHON", "") or sys.executable
#: the folder name of this checkout on the test server: unique, so that neither the whitelist nor the template
#: list can mix it up with a copy of the pack installed in that ComfyUI (usually custom_nodes/comfyui-csd-3d)
PACK_DIR_NAME = f"comfyui-csd-3d-under-test-{uuid.uuid4().hex[:8]}"

pytestmark = pytest.mark.skipif(not COMFY_ROOT, reason="set CSD_COMFYUI_ROOT (and CSD_COMFYUI_PYTHON) to run the "
                                                       "workflows on a real ComfyUI server")


# ---------------------------------------------------------------------------------------------- websocket
class WebSocket:
    """A minimal client for ComfyUI's /ws (text frames: JSON events; binary frames: previews)."""

    def __init__(self, host: str, port: int, path: str):
        self.sock = socket.create_connection((host, port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("websocket handshake failed")
            head += chunk
        assert b" 101 " in head.split(b"\r\n", 1)[0], head
        self.sock.settimeout(None)
        self.events: List[dict] = []
        self.binary: List[bytes] = []
        self.closed = False
        threading.Thread(target=self._reader, daemon=True).start()

    def _recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def _reader(self):
        try:
            while True:
                b0, b1 = self._recv(2)
                opcode, n = b0 & 0x0F, b1 & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self._recv(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self._recv(8))[0]
                payload = self._recv(n)
                if opcode == 1:
                    self.events.append(json.loads(payload))
                elif opcode == 2:
                    self.binary.append(payload)
                elif opcode == 8:
                    break
        except (ConnectionError, OSError, ValueError):
            pass
        self.closed = True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------- server
@dataclass
class Server:
    url: str
    port: int
    base: Path
    proc: subprocess.Popen
    log: Path
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    ws: WebSocket = None

    @property
    def output(self) -> Path:
        return self.base / "output"

    def request(self, method: str, path: str, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw[:1] in (b"{", b"[") else raw)
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, (json.loads(raw) if raw[:1] in (b"{", b"[") else raw)

    def queue(self, prompt: dict, ui: dict = None) -> str:
        body = {"prompt": prompt, "client_id": self.client_id}
        if ui is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": ui}}
        status, answer = self.request("POST", "/prompt", body)
        assert status == 200, answer
        assert answer["node_errors"] == {}, answer
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            assert self.proc.poll() is None, f"the server died; see {self.log}"
            status, history = self.request("GET", f"/history/{prompt_id}")
            if status == 200 and prompt_id in history:
                return history[prompt_id]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s; see {self.log}")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(base: Path, packs: dict) -> Server:
    """Start ComfyUI with ``base`` as its base directory (models, custom_nodes, output, input, temp, user) and only
    the packs ``{folder name: path}``, linked into ``base/custom_nodes`` and whitelisted.

    ``--base-directory`` keeps the ComfyUI checkout's own ``custom_nodes`` (where this pack may be installed too)
    and models out of the test, and ``--disable-all-custom-nodes --whitelist-custom-nodes`` loads only the named
    folders (the whitelist matches folder names in every custom_nodes path, hence unique names).
    """
    root = Path(COMFY_ROOT).resolve()
    assert (root / "main.py").is_file(), f"CSD_COMFYUI_ROOT={COMFY_ROOT} is not a ComfyUI folder (no main.py)"
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    for name, path in packs.items():
        (base / "custom_nodes" / name).symlink_to(path, target_is_directory=True)
    for d in ("output", "input", "temp", "user", "models"):
        (base / d).mkdir(exist_ok=True)
    port = _free_port()
    cmd = [COMFY_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--base-directory", str(base), "--disable-all-custom-nodes", "--whitelist-custom-nodes", *packs,
           "--disable-api-nodes", "--output-directory", str(base / "output"), "--input-directory",
           str(base / "input"), "--temp-directory", str(base / "temp"), "--user-directory", str(base / "user"),
           "--database-url", "sqlite:///:memory:"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log = base / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=str(root), stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", port, base, proc, log)
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{srv.log_tail()}")
            try:
                if srv.request("GET", "/system_stats")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() - t0 > 240:
                pytest.fail(f"ComfyUI did not answer in 240 s:\n{srv.log_tail()}")
            time.sleep(0.5)
    except BaseException:
        _stop_server(srv)
        raise
    return srv


def _stop_server(srv: Server) -> None:
    if srv.ws is not None:
        srv.ws.close()
    if srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(30)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_sd, tiny_mvdream):
    base = tmp_path_factory.mktemp("comfyui")
    (base / "models" / "diffusers").mkdir(parents=True)
    (base / "models" / "diffusers" / "tiny-sd").symlink_to(tiny_sd["folder"], target_is_directory=True)
    (base / "models" / "diffusers" / "tiny-mvdream").symlink_to(tiny_mvdream["folder"], target_is_directory=True)
    # Load Checkpoint needs a single file ComfyUI recognises (the tiny SD is too small for its model detection): a
    # random SD 1.5-layout checkpoint with a narrow two-level UNet, full CLIP-L and VAE (0.57 GB, about 20 s)
    from test_comfy_prior_real import write_sd15_checkpoint

    write_sd15_checkpoint(base / "models" / "checkpoints" / cs.STUB_CHECKPOINT, Path(COMFY_ROOT), small_unet=True)
    srv = _start_server(base, {PACK_DIR_NAME: cs.ROOT})
    try:
        srv.ws = WebSocket("127.0.0.1", srv.port, f"/ws?clientId={srv.client_id}")
        yield srv
    finally:
        _stop_server(srv)


class _ObjectInfoNode:
    """INPUT_TYPES from /object_info, for clamping the test values into the server's widget ranges."""

    def __init__(self, info):
        self.info = info

    def INPUT_TYPES(self):
        return {cat: {k: tuple(v) for k, v in self.info["input"].get(cat, {}).items()}
                for cat in ("required", "optional")}


def _classes(server):
    status, info = server.request("GET", "/object_info")
    assert status == 200
    return {name: _ObjectInfoNode(v) for name, v in info.items()}


# ---------------------------------------------------------------------------------------------------- tests
def test_server_lists_the_nodes_models_and_templates(server):
    status, info = server.request("GET", "/object_info")
    assert status == 200
    missing = {"CSDLoadDiffusionModel", "CSDGuidance", "CSDScene", "CSDCameras", "CSDOptimize", "CSDRenderViews",
               "CSDExtractMesh", "CSDSaveMesh"} - set(info)
    assert not missing, f"nodes missing on the server: {missing}\n{server.log_tail()}"
    assert info["CSDOptimize"]["category"] == "CSD 3D"
    assert "diffusers/tiny-sd" in info["CSDLoadDiffusionModel"]["input"]["required"]["model"][0]
    log = server.log.read_text(errors="replace")
    assert "IMPORT FAILED" not in log
    # the nodes are this checkout's, loaded once, whatever is installed in that ComfyUI
    assert info["CSDOptimize"]["python_module"] == f"custom_nodes.{PACK_DIR_NAME}", info["CSDOptimize"]
    assert "two copies of this node pack" not in log
    status, templates = server.request("GET", "/workflow_templates")
    assert status == 200 and sorted(templates[PACK_DIR_NAME]) == cs.workflow_names(), templates
    status, ui = server.request("GET", f"/api/workflow_templates/{PACK_DIR_NAME}/{cs.TEMPLATES['text_to_3d']}.json")
    assert status == 200 and ui["nodes"], "the template files are served to the frontend"
    for name in cs.workflow_names():  # the card images of the Templates dialog
        status, data = server.request("GET", f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.jpg")
        assert status == 200 and data[:3] == b"\xff\xd8\xff", (name, status)


@pytest.mark.parametrize("name", cs.workflow_names())
def test_api_workflow_runs_on_the_server(server, name):
    prompt = cs.for_tests(cs.load_api(name), _classes(server))
    for node in prompt.values():  # ComfyUI caches outputs across prompts: the workflows share their first stage
        if node["class_type"] == "CSDOptimize":
            node["inputs"]["run_name"] = f"{name}-{node['inputs']['run_name']}"
    before = len(server.ws.binary)
    prompt_id = server.queue(prompt, ui=cs.load_ui(name))
    entry = server.wait(prompt_id)
    status = entry["status"]
    assert status["status_str"] == "success" and status["completed"], json.dumps(status, indent=1)[:4000]
    steps = cs.TEST_OVERRIDES["CSDOptimize"]["steps"]
    outputs = entry["outputs"]
    for nid, node in prompt.items():
        kind = node["class_type"]
        if kind == "SaveImage":
            images = outputs[nid]["images"]
            assert len(images) == cs.TEST_OVERRIDES["CSDRenderViews"]["n_views"]
            for img in images:
                assert (server.output / img["subfolder"] / img["filename"]).is_file()
        elif kind == "Preview3D":
            model_file = outputs[nid]["result"][0]
            assert (server.output / model_file).is_file()
            sub, fname = os.path.split(model_file)
            q = urllib.parse.urlencode({"filename": fname, "subfolder": sub, "type": "output"})
            code, data = server.request("GET", f"/view?{q}")  # what the frontend's 3D viewer loads
            assert code == 200 and data[:4] == b"glTF"
        elif kind == "CSDOptimize":
            run = server.output / "csd3d" / "runs" / f"{node['inputs']['run_name']}_00001"
            assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.json").is_file()
    # the progress bar moved for every step of every Optimize and live previews were sent (binary type 1)
    deadline = time.time() + 10
    optimizes = [k for k, v in prompt.items() if v["class_type"] == "CSDOptimize"]
    while time.time() < deadline:
        progress = [e["data"] for e in server.ws.events if e.get("type") == "progress"
                    and e["data"].get("prompt_id") == prompt_id]
        if all(any(p["node"] == k and p["value"] == steps for p in progress) for k in optimizes):
            break
        time.sleep(0.2)
    for k in optimizes:
        values = [p["value"] for p in progress if p["node"] == k]
        assert values == list(range(1, steps + 1)), (k, values)
    previews = [b for b in server.ws.binary[before:] if b[:4] == struct.pack(">I", 1)]
    assert len(previews) >= len(optimizes) * steps, len(previews)
    assert previews[0][4:8] == struct.pack(">I", 1) and previews[0][8:10] == b"\xff\xd8", "JPEG previews"


def test_cpu_template_runs_as_shipped_on_the_server(server):
    """The CPU template needs no download: queued exactly as shipped (its API twin; only the run name made unique,
    as ComfyUI would otherwise reuse nothing anyway) on a server without Stable Diffusion it is accepted (no HTTP
    400) and runs end to end with the toy prior that ships with the pack, mesh and Preview 3D included."""
    name = cs.TEMPLATES["cpu"]
    prompt = cs.load_api(name)
    opt = next(k for k, v in prompt.items() if v["class_type"] == "CSDOptimize")
    prompt[opt]["inputs"]["run_name"] = f"{prompt[opt]['inputs']['run_name']}_as_shipped"
    t0 = time.time()
    entry = server.wait(server.queue(prompt, ui=cs.load_ui(name)), timeout=1800)
    seconds = time.time() - t0
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]
    preview = next(k for k, v in prompt.items() if v["class_type"] == "Preview3D")
    model_file = entry["outputs"][preview]["result"][0]
    assert (server.output / model_file).is_file() and model_file.endswith(".glb")
    ckpt = server.output / "csd3d" / "runs" / f"{prompt[opt]['inputs']['run_name']}_00001" / "config.json"
    assert json.loads(ckpt.read_text())["prior"]["model"] == "toy"
    print(f"{name} as shipped: {seconds:.0f} s from queueing to the end on this server")


def test_server_offers_the_comfy_model_prior_and_the_test_checkpoint(server):
    status, info = server.request("GET", "/object_info/CSDPriorFromComfyModel")
    assert status == 200 and info["CSDPriorFromComfyModel"]["display_name"] == "CSD Prior from ComfyUI Model"
    status, info = server.request("GET", "/object_info/CheckpointLoaderSimple")
    assert cs.STUB_CHECKPOINT in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]


def test_bad_values_are_rejected_with_the_input_named(server):
    classes = _classes(server)
    prompt = cs.for_tests(cs.without_missing_nodes(cs.load_api(cs.TEMPLATES["text_to_3d"]), classes), classes)
    cams = next(k for k, v in prompt.items() if v["class_type"] == "CSDCameras")
    opt = next(k for k, v in prompt.items() if v["class_type"] == "CSDOptimize")
    prompt[cams]["inputs"].update({"elevation_min": 60.0, "elevation_max": 30.0})
    prompt[opt]["inputs"]["steps"] = 0
    status, answer = server.request("POST", "/prompt", {"prompt": prompt, "client_id": server.client_id})
    assert status == 400, answer
    details = json.dumps(answer["node_errors"])
    assert "elevation_min/elevation_max" in details and "steps" in details, details


def test_cancel_then_resume_on_the_server(server):
    classes = _classes(server)
    api = cs.for_tests(cs.load_api(cs.TEMPLATES["text_to_3d"]), classes)
    keep = {"CSDLoadDiffusionModel", "CSDGuidance", "CSDScene", "CSDCameras", "CSDOptimize", "PreviewImage"}
    prompt = {k: v for k, v in api.items() if v["class_type"] in keep}
    opt = next(k for k, v in prompt.items() if v["class_type"] == "CSDOptimize")
    steps = 200
    prompt[opt]["inputs"].update({"steps": steps, "checkpoint_every": 0, "run_name": "server_cancel"})
    prompt_id = server.queue(prompt)
    t0 = time.time()
    while not any(e.get("type") == "progress" and e["data"].get("prompt_id") == prompt_id and e["data"]["value"] >= 2
                  for e in server.ws.events):
        assert time.time() - t0 < 300, server.log_tail()
        time.sleep(0.05)
    server.request("POST", "/interrupt", {"prompt_id": prompt_id})
    entry = server.wait(prompt_id)
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [m[0] for m in entry["status"]["messages"]], entry["status"]
    ckpt = server.output / "csd3d" / "runs" / "server_cancel_00001" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file(), "Cancel keeps a checkpoint even with checkpoint_every = 0"
    from csd_backend.io import load_checkpoint

    stopped = load_checkpoint(ckpt)["step"]
    assert 2 <= stopped < steps

    prompt[opt]["inputs"].update({"resume": True, "steps": stopped + 3})
    entry = server.wait(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:4000]
    assert load_checkpoint(ckpt)["step"] == stopped + 3
    assert not (server.output / "csd3d" / "runs" / "server_cancel_00002").exists()


def test_two_copies_of_the_pack_log_a_warning_naming_both(tmp_path):
    """Two copies of the pack in one ComfyUI (a link to this checkout and a plain copy of it): the server starts,
    and the log names both folders."""
    import shutil

    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy2(cs.ROOT / "__init__.py", copy / "__init__.py")
    for sub in ("nodes", "csd_backend", "example_workflows"):
        shutil.copytree(cs.ROOT / sub, copy / sub, ignore=shutil.ignore_patterns("__pycache__"))
    first, second = f"{PACK_DIR_NAME}-a", f"{PACK_DIR_NAME}-b"
    srv = _start_server(tmp_path / "comfyui", {first: cs.ROOT, second: copy})
    try:
        status, info = srv.request("GET", "/object_info")
        assert status == 200 and "CSDOptimize" in info
    finally:
        _stop_server(srv)
    lines = [line for line in srv.log.read_text(errors="replace").splitlines()
             if "two copies of this node pack are loaded" in line]
    assert len(lines) == 1, srv.log_tail()
    for name in (first, second):
        assert str(tmp_path / "comfyui" / "custom_nodes" / name) in lines[0], lines[0]
