"""A minimal fleetgate device: authenticates, reports a status every 5 seconds (QoS 1),
answers every command with a result, and applies desired state (`delta` frames) by reporting
it back. Needs `pip install websockets`.

usage: python3 examples/device.py DEVICE_ID SECRET [ws://127.0.0.1:8080/v1/device]

Over wss://, DEVICE_CA names the CA bundle to trust (scripts/dev-certs writes ca.pem), and
DEVICE_CERT + DEVICE_KEY a client certificate: with mTLS the certificate authenticates the
device and SECRET is `-` (no auth frame is sent).

MAC_KEY (the `macKey` of `POST /v1/devices/{id}/mac-key`) makes it sign every message
(docs/PROTOCOL.md, "Message signatures").
"""
import asyncio
import hashlib
import hmac
import itertools
import json
import os
import random
import secrets
import ssl
import sys
import time

import websockets

DEVICE, SECRET = sys.argv[1], sys.argv[2]
URL = sys.argv[3] if len(sys.argv) > 3 else "ws://127.0.0.1:8080/v1/device"
# msgids must not repeat within the replay window, across restarts too: a random prefix each run.
PREFIX = secrets.token_hex(6)
ids = itertools.count(1)
MAC_KEY = bytes.fromhex(os.environ["MAC_KEY"]) if os.environ.get("MAC_KEY") else None


def envelope(kind, payload, qos):
    return {"ver": "1.0", "msgid": f"{PREFIX}-{next(ids)}",
            "timestamp": int(time.time() * 1000), "from": DEVICE, "to": "server",
            "type": kind, "payload": payload, "qos": qos}


def encode(env):
    """The frame's text; signed when there is a MAC key. json.dumps writes a nested value
    exactly as it writes it alone, so the payload bytes signed are the ones sent."""
    if MAC_KEY:
        env["nonce"] = secrets.token_hex(12)
        lines = [env["ver"], env["type"], env["msgid"], str(env["timestamp"]), env["from"],
                 env["to"], str(env["qos"]), "0", "0", env["nonce"]]
        canonical = ("fleetgate-mac-v1\n" + "".join(f"{v}\n" for v in lines)).encode()
        canonical += json.dumps(env["payload"]).encode()
        env["sig"] = hmac.new(MAC_KEY, canonical, hashlib.sha256).hexdigest()
    return json.dumps(env)


async def report(ws):
    while True:
        status = envelope("status", {"values": [
            {"tag": "temperature", "value": round(20 + random.random() * 5, 2), "unit": "C"}],
            "quality": "good"}, 1)
        await ws.send(encode(status))
        await asyncio.sleep(5)


def tls_context():
    if not URL.startswith("wss://"):
        return None
    ctx = ssl.create_default_context(cafile=os.environ.get("DEVICE_CA"))
    if os.environ.get("DEVICE_CERT"):
        ctx.load_cert_chain(os.environ["DEVICE_CERT"], os.environ.get("DEVICE_KEY"))
    return ctx


async def main():
    async with websockets.connect(URL, additional_headers={"Device-ID": DEVICE},
                                  ssl=tls_context()) as ws:
        if SECRET != "-":
            await ws.send(json.dumps({"type": "auth", "deviceId": DEVICE, "token": SECRET}))
        print("<-", await ws.recv())
        reporter = asyncio.create_task(report(ws))
        async for raw in ws:
            frame = json.loads(raw)
            print("<-", frame)
            if frame.get("type") == "command":
                answer = {"type": "ack" if frame["qos"] == 1 else "rec", "msgid": frame["msgid"],
                          "payload": {"result": {"done": frame["payload"]}}}
                if frame["qos"] > 0:
                    await ws.send(json.dumps(answer))
                    print("->", answer)
            elif frame.get("type") == "delta":
                # Apply the desired state, then report it: that empties the delta.
                applied = envelope("status", frame["payload"]["state"], 1)
                await ws.send(encode(applied))
                print("->", applied)
            elif frame.get("type") == "rel":
                await ws.send(json.dumps({"type": "comp", "msgid": frame["msgid"]}))
        reporter.cancel()


asyncio.run(main())
