"""A dashboard written with Python's `websockets`, not our SDK: subscribes to a device over
/v1/app, counts what arrives while the device (also plain `websockets`) reports, then comes
back with its last offset and recovers what it missed.

usage: app.py GATEWAY_WS_BASE API_KEY DEVICE_ID SECRET
"""
import asyncio
import json
import sys
import time

import websockets

BASE, API_KEY, DEVICE, SECRET = sys.argv[1:5]
CHANNEL = "device:" + DEVICE


def now_ms():
    return int(time.time() * 1000)


async def recv_json(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def report(dev, first, n):
    for i in range(first, first + n):
        env = {"ver": "1.0", "msgid": f"py{i}", "timestamp": now_ms(), "from": DEVICE,
               "to": "server", "type": "status", "payload": {"n": i}, "qos": 1}
        await dev.send(json.dumps(env))
        ack = await recv_json(dev)
        assert ack["type"] == "ack", ack


async def main():
    dev = await websockets.connect(BASE + "/v1/device")
    await dev.send(json.dumps({"type": "auth", "deviceId": DEVICE, "token": SECRET}))
    assert (await recv_json(dev))["status"] == "success"

    # First-frame auth, as a browser (which cannot set headers) does.
    app = await websockets.connect(BASE + "/v1/app")
    await app.send(json.dumps({"type": "auth", "token": API_KEY}))
    auth = await recv_json(app)
    assert auth["type"] == "auth_response" and auth["status"] == "success", auth
    await app.send(json.dumps({"type": "subscribe", "channel": CHANNEL, "id": "s1"}))
    sub = await recv_json(app)
    assert sub["type"] == "subscribed" and sub["id"] == "s1", sub
    epoch, last = sub["epoch"], sub["offset"]

    await report(dev, 0, 20)
    for i in range(20):
        m = await recv_json(app)
        assert m["type"] == "message" and m["channel"] == CHANNEL, m
        assert m["offset"] == last + 1 and m["data"]["payload"]["n"] == i, m
        last = m["offset"]
    print("live: 20 sent, 20 received")
    await app.close()

    await report(dev, 20, 5)
    back = await websockets.connect(BASE + "/v1/app",
                                    additional_headers={"Authorization": "Bearer " + API_KEY})
    await back.send(json.dumps({"type": "subscribe", "channel": CHANNEL, "id": "s2",
                                "since": last, "epoch": epoch}))
    sub = await recv_json(back)
    assert sub["type"] == "subscribed" and sub["recovered"] == 5, sub
    for i in range(20, 25):
        m = await recv_json(back)
        assert m["offset"] == last + 1 and m["data"]["payload"]["n"] == i, m
        last = m["offset"]
    print("recovered: 5 missed, 5 received")
    await back.close()
    await dev.close()
    print("interop: all steps passed")


asyncio.run(main())
