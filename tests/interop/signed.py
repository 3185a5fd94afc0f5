"""A signing device written with Python's `websockets` and `hmac`, not our SDK: it builds the
canonical form from docs/PROTOCOL.md ("Message signatures") the way a device in C would.

usage: signed.py WS_URL DEVICE_ID SECRET MAC_KEY_HEX
"""
import asyncio
import hashlib
import hmac
import json
import secrets
import sys
import time

import websockets

WS_URL, DEVICE, SECRET, KEY_HEX = sys.argv[1:5]
KEY = bytes.fromhex(KEY_HEX)


def check(cond, what):
    if not cond:
        print("interop: FAILED:", what)
        sys.exit(1)
    print("interop: ok:", what)


def signed(msgid, payload_text, qos=1, nonce=None, key=KEY):
    """The frame as text: the payload is written once and signed as written."""
    nonce = nonce or secrets.token_hex(12)
    ts = int(time.time() * 1000)
    fields = ["fleetgate-mac-v1", "1.0", "event", msgid, str(ts), DEVICE, "server",
              str(qos), "0", "0", nonce]
    canonical = ("\n".join(fields) + "\n").encode() + payload_text.encode()
    sig = hmac.new(key, canonical, hashlib.sha256).hexdigest()
    return ('{"ver":"1.0","msgid":"%s","timestamp":%d,"from":"%s","to":"server","type":"event",'
            '"payload":%s,"qos":%d,"nonce":"%s","sig":"%s"}'
            % (msgid, ts, DEVICE, payload_text, qos, nonce, sig))


async def recv_json(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def main():
    async with websockets.connect(WS_URL, additional_headers={
            "Authorization": "Bearer " + SECRET, "Device-ID": DEVICE}) as ws:
        resp = await recv_json(ws)
        check(resp.get("status") == "success", "header auth")

        frame = signed("py-s1", '{"door": "open", "ä": 1.50}')
        await ws.send(frame)
        check(await recv_json(ws) == {"type": "ack", "msgid": "py-s1"}, "signed event acked")

        await ws.send(frame)
        err = await recv_json(ws)
        check(err["type"] == "error" and err["payload"]["code"] == "bad_signature"
              and err["msgid"] == "py-s1", "replayed frame refused")

        await ws.send(signed("py-s2", '{"door": "shut"}').replace("shut", "open"))
        err = await recv_json(ws)
        check(err["payload"]["code"] == "bad_signature"
              and err["payload"]["message"] == "signature mismatch", "tampered frame refused")

        await ws.send(signed("py-s3", '{"door": "shut"}', key=b"\x00" * 32))
        err = await recv_json(ws)
        check(err["payload"]["message"] == "signature mismatch", "wrong key refused")

        await ws.send(signed("py-s4", "[1,2,3]", qos=0))
        await ws.send(signed("py-s5", '{"last": true}'))
        check(await recv_json(ws) == {"type": "ack", "msgid": "py-s5"},
              "the session goes on after refusals")
    print("interop: all steps passed")


asyncio.run(main())
