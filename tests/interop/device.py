"""A device written with Python's `websockets`, not our SDK: it checks that the wire format
works for clients that share none of our types.

usage: device.py WS_URL ADMIN_URL API_KEY DEVICE_ID SECRET
"""
import asyncio
import json
import sys
import time
import urllib.request

import websockets

WS_URL, ADMIN_URL, API_KEY, DEVICE, SECRET = sys.argv[1:6]


def now_ms():
    return int(time.time() * 1000)


def rest(method, path, body=None):
    req = urllib.request.Request(
        ADMIN_URL + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + API_KEY, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def check(cond, what):
    if not cond:
        print("interop: FAILED:", what)
        sys.exit(1)
    print("interop: ok:", what)


async def recv_json(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def main():
    async with websockets.connect(WS_URL, subprotocols=["fleetgate.v1.json"]) as ws:
        check(ws.subprotocol == "fleetgate.v1.json", "subprotocol negotiated")
        await ws.send(json.dumps({"type": "auth", "deviceId": DEVICE, "token": SECRET}))
        resp = await recv_json(ws)
        check(resp["type"] == "auth_response" and resp["status"] == "success", "first-frame auth")

        await ws.send(json.dumps({"ver": "1.0", "msgid": "py-1", "timestamp": now_ms(), "from": DEVICE,
                                  "to": "server", "type": "status", "payload": {"temp": 20.5}, "qos": 1}))
        check(await recv_json(ws) == {"type": "ack", "msgid": "py-1"}, "QoS 1 status acked")

        await ws.send(json.dumps({"ver": "1.0", "msgid": "py-2", "timestamp": now_ms(), "from": DEVICE,
                                  "to": "server", "type": "event", "payload": {"door": "open"}, "qos": 2}))
        check(await recv_json(ws) == {"type": "rec", "msgid": "py-2"}, "QoS 2 rec")
        await ws.send(json.dumps({"type": "rel", "msgid": "py-2"}))
        check(await recv_json(ws) == {"type": "comp", "msgid": "py-2"}, "QoS 2 comp")

        # The seed's own device frame.
        await ws.send(json.dumps({"type": "status", "deviceId": DEVICE, "timestamp": now_ms(),
                                  "data": {"battery": 77}}))

        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(None, rest, "POST", f"/v1/devices/{DEVICE}/commands",
                                    {"payload": {"action": "reboot"}, "qos": 1, "waitMs": 5000})
        cmd = await recv_json(ws)
        check(cmd["type"] == "command" and cmd["payload"] == {"action": "reboot"} and cmd["to"] == DEVICE,
              "command received")
        await ws.send(json.dumps({"type": "ack", "msgid": cmd["msgid"], "payload": {"result": "rebooting"}}))
        status, body = await call
        check(status == 200 and body == {"msgid": cmd["msgid"], "result": "rebooting"}, "command result via REST")

        status, dev = rest("GET", f"/v1/devices/{DEVICE}")
        check(status == 200 and dev["shadow"]["reported"] == {"temp": 20.5, "battery": 77}, "shadow merged")

        await ws.send(json.dumps({"ver": "1.0", "msgid": "py-3", "timestamp": now_ms(), "from": "someone-else",
                                  "to": "server", "type": "status", "payload": {}, "qos": 1}))
        try:
            await recv_json(ws)
            check(False, "spoofed from closes the session")
        except websockets.ConnectionClosed as closed:
            check(closed.rcvd is not None and closed.rcvd.code == 4400, "spoofed from -> 4400")

    headers = {"Authorization": "Bearer " + SECRET, "Device-ID": DEVICE}
    async with websockets.connect(WS_URL, additional_headers=headers) as ws:
        resp = await recv_json(ws)
        check(resp["status"] == "success", "header auth")
    print("interop: all steps passed")


asyncio.run(main())
