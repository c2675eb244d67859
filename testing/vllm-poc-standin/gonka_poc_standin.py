"""A STAND-IN for the `gonka_poc` vLLM plugin's HTTP surface, for tests only.

The real plugin (gonka-ai/gonka-vllm-plugins, not on PyPI) adds PoC v2 routes under
`/api/v1/pow/*` to each vLLM server and computes artifacts from the served model's hidden
states through a worker extension. This stand-in speaks the same routes with the same request
and answer shapes (written from the plugin's `gonka_poc/poc/routes.py`), so the node-daemon's
fan-out, id rewriting and callbacks can be tested against real vLLM servers, but its vectors are
NOT PoC: each is a unit vector derived from sha256(block_hash, public_key, nonce), the same on
every instance, so honest validation passes and altered vectors fail. Inference stays vLLM's.

Loaded into vLLM with its own `--middleware gonka_poc_standin.PocRoutes` (this directory on
PYTHONPATH). While a round generates, chat and completions get 503, as the plugin's gate does.
`GONKA_STANDIN_CALLBACK_INTERVAL` (seconds, default 5 as upstream) sets how often artifacts are
posted.
"""

import asyncio
import base64
import hashlib
import json
import math
import os
import struct
import sys
import time
import uuid

import aiohttp

CALLBACK_INTERVAL = float(os.environ.get("GONKA_STANDIN_CALLBACK_INTERVAL", "5"))
MAX_QUEUED_NONCES = 100_000
GATED = ("/v1/chat/completions", "/v1/completions")

_state = {"gen_task": None, "sender_task": None, "stop": None, "config": None, "stats": None}
_jobs = {}
_queued = {"nonces": 0}


def vector_b64(block_hash, public_key, nonce, k_dim):
    """The stand-in's artifact: k_dim float16 LE, a unit vector from a hash (not PoC)."""
    raw = b""
    counter = 0
    while len(raw) < 2 * k_dim:
        raw += hashlib.sha256(f"{block_hash}_{public_key}_nonce{nonce}_{counter}".encode()).digest()
        counter += 1
    values = [struct.unpack_from("<H", raw, 2 * i)[0] / 65535.0 - 0.5 for i in range(k_dim)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return base64.b64encode(struct.pack(f"<{k_dim}e", *[v / norm for v in values])).decode()


def decode(b64, k_dim):
    data = base64.b64decode(b64)
    if len(data) != 2 * k_dim:
        return None
    return struct.unpack(f"<{k_dim}e", data)


def served_names():
    """The names vLLM serves, from its command line (the plugin reads app state)."""
    names, args = set(), sys.argv
    for flag in ("--model", "--served-model-name"):
        for i, a in enumerate(args):
            if a == flag and i + 1 < len(args):
                names.add(args[i + 1])
            elif a.startswith(flag + "="):
                names.add(a.split("=", 1)[1])
    return names


def params_mismatch(params):
    valid = served_names()
    if valid and params.get("model") not in valid:
        return {
            "error": "params mismatch",
            "requested": {"model": params.get("model"), "seq_len": params.get("seq_len"),
                          "k_dim": params.get("k_dim", 12)},
            "deployed": {"model": sorted(valid), "seq_len": None, "k_dim": None},
        }
    return None


def generating():
    task = _state["gen_task"]
    return task is not None and not task.done()


def binomial_tail(n, k, p):
    """P(X >= k) for X ~ Binomial(n, p)."""
    return min(1.0, sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def artifacts_for(body, nonces):
    k_dim = body["params"].get("k_dim", 12)
    return [{"nonce": n, "vector_b64": vector_b64(body["block_hash"], body["public_key"], n, k_dim)}
            for n in nonces]


def validate(body, computed):
    k_dim = body["params"].get("k_dim", 12)
    stat = body.get("stat_test") or {}
    dist_threshold = stat.get("dist_threshold", 0.02)
    p_mismatch = stat.get("p_mismatch", 0.001)
    fraud_threshold = stat.get("fraud_threshold", 0.01)
    given = {a["nonce"]: a["vector_b64"] for a in body["validation"]["artifacts"]}
    mismatches = []
    for art in computed:
        theirs = decode(given[art["nonce"]], k_dim)
        ours = decode(art["vector_b64"], k_dim)
        dist = math.inf if theirs is None else math.sqrt(sum((a - b) ** 2 for a, b in zip(ours, theirs)))
        if dist > dist_threshold:
            mismatches.append(art["nonce"])
    n_total = len(body["nonces"])
    p_value = binomial_tail(n_total, len(mismatches), p_mismatch)
    return {
        "block_hash": body["block_hash"], "block_height": body["block_height"],
        "public_key": body["public_key"], "node_id": body["node_id"],
        "n_total": n_total, "n_mismatch": len(mismatches), "mismatch_nonces": mismatches,
        "p_value": p_value, "fraud_detected": p_value < fraud_threshold,
    }


def wire_encoding(k_dim):
    return {"dtype": "f16", "k_dim": k_dim, "endian": "le"}


async def post(url, payload):
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=payload, timeout=aiohttp.ClientTimeout(total=30)) as r:
            return r.status


async def generation_loop(config, stop, buffer):
    offset = config["node_id"] + config["group_id"] * config["node_count"]
    step = config["n_groups"] * config["node_count"]
    x = 0
    while not stop.is_set():
        nonces = [offset + (x + i) * step for i in range(config["batch_size"])]
        x += config["batch_size"]
        buffer.extend(artifacts_for(config["body"], nonces))
        _state["stats"]["total_processed"] += len(nonces)
        await asyncio.sleep(0.05)


async def sender_loop(config, stop, buffer):
    url = config["body"]["url"].rstrip("/") + "/generated"
    k_dim = config["body"]["params"].get("k_dim", 12)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), CALLBACK_INTERVAL)
        except asyncio.TimeoutError:
            pass
        if stop.is_set():
            return  # the plugin drops what is buffered at stop
        batch, buffer[:] = buffer[:], []
        if batch:
            payload = {k: config["body"][k] for k in ("block_hash", "block_height", "public_key", "node_id")}
            payload.update({"artifacts": batch, "encoding": wire_encoding(k_dim)})
            try:
                await post(url, payload)
            except Exception:
                buffer[:0] = batch


async def stop_round():
    if _state["stop"] is not None:
        _state["stop"].set()
    for key in ("gen_task", "sender_task"):
        task = _state[key]
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        _state[key] = None


async def run_job(request_id, body):
    _jobs[request_id]["status"] = "running"
    while generating():
        await asyncio.sleep(0.1)
    computed = artifacts_for(body, body["nonces"])
    if body.get("validation"):
        result = validate(body, computed)
        kind = "validated"
        callback = dict(result, request_id=request_id)
    else:
        result = {"artifacts": computed, "encoding": wire_encoding(body["params"].get("k_dim", 12))}
        kind = "generated"
        callback = {k: body[k] for k in ("block_hash", "block_height", "public_key", "node_id")}
        callback.update(result, request_id=request_id)
    _jobs[request_id].update(status="completed", result=result)
    _queued["nonces"] -= len(body["nonces"])
    if body.get("url"):
        try:
            await post(body["url"].rstrip("/") + "/" + kind, callback)
        except Exception:
            pass


async def handle(method, path, body):
    """(status, answer) for a PoC route, as the plugin's routes answer."""
    if method == "POST" and path == "/api/v1/pow/init/generate":
        mismatch = params_mismatch(body["params"])
        if mismatch:
            return 409, {"detail": mismatch}
        if generating():
            return 409, {"detail": "Already generating"}
        await stop_round()
        config = {
            "body": body, "node_id": body["node_id"], "node_count": body["node_count"],
            "group_id": body.get("group_id", 0), "n_groups": body.get("n_groups", 1),
            "batch_size": body.get("batch_size", 32),
        }
        stop, buffer = asyncio.Event(), []
        _state.update(stop=stop, config=config, stats={"start_time": time.time(), "total_processed": 0})
        _state["gen_task"] = asyncio.get_running_loop().create_task(generation_loop(config, stop, buffer))
        if body.get("url"):
            _state["sender_task"] = asyncio.get_running_loop().create_task(sender_loop(config, stop, buffer))
        return 200, {"status": "OK", "pow_status": {"status": "GENERATING"}}
    if method == "POST" and path == "/api/v1/pow/stop":
        await stop_round()
        _jobs.clear()
        _queued["nonces"] = 0
        return 200, {"status": "OK", "pow_status": {"status": "STOPPED"}}
    if method == "GET" and path == "/api/v1/pow/status":
        if not generating():
            return 200, {"status": "IDLE", "config": None, "stats": None}
        c, stats = _state["config"], _state["stats"]
        elapsed = time.time() - stats["start_time"]
        fields = ("block_hash", "block_height", "public_key", "node_id", "node_count")
        config = {k: c["body"][k] for k in fields}
        config.update(group_id=c["group_id"], n_groups=c["n_groups"], seq_len=c["body"]["params"]["seq_len"],
                      k_dim=c["body"]["params"].get("k_dim", 12))
        return 200, {"status": "GENERATING", "config": config,
                     "stats": {"total_processed": stats["total_processed"],
                               "nonces_per_second": stats["total_processed"] / elapsed if elapsed > 0 else 0}}
    if method == "POST" and path == "/api/v1/pow/generate":
        mismatch = params_mismatch(body["params"])
        if mismatch:
            return 409, {"detail": mismatch}
        if body.get("validation"):
            if {a["nonce"] for a in body["validation"]["artifacts"]} != set(body["nonces"]):
                return 400, {"detail": "validation.artifacts nonces must match nonces field"}
        if not body.get("wait"):
            if _queued["nonces"] + len(body["nonces"]) > MAX_QUEUED_NONCES:
                return 429, {"detail": f"Queue full: {_queued['nonces']} nonces queued, limit is {MAX_QUEUED_NONCES}"}
            request_id = str(uuid.uuid4())
            _jobs[request_id] = {"status": "queued"}
            _queued["nonces"] += len(body["nonces"])
            asyncio.get_running_loop().create_task(run_job(request_id, body))
            return 200, {"status": "queued", "request_id": request_id, "queued_count": len(body["nonces"])}
        while generating():
            await asyncio.sleep(0.1)
        computed = artifacts_for(body, body["nonces"])
        if body.get("validation"):
            return 200, dict({"status": "completed", "request_id": str(uuid.uuid4())}, **validate(body, computed))
        return 200, {"status": "completed", "request_id": str(uuid.uuid4()), "artifacts": computed,
                     "encoding": wire_encoding(body["params"].get("k_dim", 12))}
    if method == "GET" and path.startswith("/api/v1/pow/generate/"):
        request_id = path.rsplit("/", 1)[1]
        job = _jobs.get(request_id)
        if job is None:
            return 404, {"detail": f"Request {request_id} not found"}
        answer = {"status": job["status"], "request_id": request_id}
        answer.update(job.get("result") or {})
        return 200, answer
    if method == "GET" and path == "/api/v1/pow/versions":
        return 200, {"vllm_version": "stand-in", "gonka_poc_version": "stand-in", "poc_validation_inference": False}
    return 404, {"detail": "Not Found"}


class PocRoutes:
    """ASGI middleware: the PoC routes, and the 503 gate on chat while a round generates."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.startswith(GATED) and generating():
            return await respond(send, 503, {"detail": "PoC generation in progress"})
        if not path.startswith("/api/v1/pow/"):
            return await self.app(scope, receive, send)
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            body = json.loads(raw) if raw else {}
            status, answer = await handle(scope["method"], path, body)
        except (KeyError, TypeError, ValueError) as e:
            status, answer = 422, {"detail": f"invalid request: {e!r}"}
        await respond(send, status, answer)


async def respond(send, status, answer):
    data = json.dumps(answer).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
