#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs: the frames and bodies of the protocol documents and
tests, and the same envelopes in Protobuf (encoded here by hand: the schema is small and
the seeds need no protoc).

Usage: fuzz/seeds.py OUT_DIR. Writes OUT_DIR/<target>/<name>; `scripts/fuzz --seed` merges
them into the committed corpus, which keeps only inputs that add coverage.
"""

import json
import os
import sys

TS = 1_700_000_000_000  # the fuzz targets' server clock (fleetgate_fuzz::NOW_MS)


def env(kind, msgid, payload, **extra):
    e = {"ver": "1.0", "msgid": msgid, "timestamp": TS, "from": "sensor-001",
         "to": "server", "type": kind, "payload": payload, "qos": 1}
    e.update(extra)
    return e


IIOT = {"values": [{"tag": "temperature", "value": 81.5, "unit": "°C"},
                   {"tag": "pressure", "value": 3}], "quality": "good"}

DEVICE = {
    "auth": {"type": "auth", "deviceId": "sensor-001", "token": "eyJhbGciOiJIUzI1NiJ9.e30.x"},
    "status": env("status", "a1b2c3d4", {"temperature": 21.5, "humidity": 40}),
    "status_iiot": env("status", "m2", IIOT, retain=True),
    "event": env("event", "e1", {"severity": "critical", "text": "door open"}, qos=2),
    "dup": env("status", "m3", {"state": 3}, dup=True),
    "signed": env("status", "s1", {"t": 21.5}, nonce="n0nce-0001", sig="ab" * 32),
    "signed_bad": env("event", "s2", [1, 2], nonce="x", sig="zz"),
    "batch": env("batch", "b1", {"items": [
        {"msgid": "i1", "timestamp": TS, "type": "status", "payload": {"temperature": 90}},
        {"msgid": "i2", "timestamp": TS + 1, "type": "event", "payload": {"x": 1}, "qos": 1},
        {"msgid": "i3", "timestamp": TS, "type": "status", "payload": IIOT, "qos": 2,
         "from": "sensor-001"}]}),
    "ack": {"type": "ack", "msgid": "a1b2c3d4"},
    "ack_result": {"type": "ack", "msgid": "c9f2", "payload": {"result": {"switch": "on"}}},
    "rec": {"type": "rec", "msgid": "q2"},
    "rel": {"type": "rel", "msgid": "q2"},
    "comp": {"type": "comp", "msgid": "q2", "payload": {"error": "busy"}},
    "compact_status": {"type": "status", "deviceId": "sensor-001", "timestamp": TS,
                       "data": {"temperature": 21}},
    "compact_iiot": {"type": "status", "deviceId": "plc-101", "timestamp": TS, **IIOT},
    "compact_event": {"type": "event", "deviceId": "d", "data": "door open"},
    "compact_batch": {"type": "batch", "data": [
        {"deviceId": "sensor-001", "timestamp": TS, "data": {"humidity": 31}},
        {"deviceId": "sensor-001", "values": [{"tag": "pressure", "value": 1}],
         "quality": "good"}]},
    "auth_response": {"type": "auth_response", "status": "success", "timestamp": TS,
                      "sessionId": "s1", "heartbeatMs": 30000},
    "auth_refused": {"type": "auth_response", "status": "error", "reason": "bad token"},
    "error": {"ver": "1.0", "type": "error", "msgid": "x",
              "payload": {"code": "replay", "message": "seen"}},
    "command": env("command", "c1", {"reboot": True}),
    "delta": env("delta", "d1", {"state": {"mode": "eco"}, "version": 3}),
}

BATCH_ITEMS = {
    "items": DEVICE["batch"]["payload"]["items"],
    "item": {"msgid": "i9", "timestamp": TS, "type": "status", "payload": {"t": -1.25},
             "retain": True, "dup": False, "ver": "1.2", "to": "server"},
}

CLIENT = {
    "app_auth": {"type": "auth", "token": "fgk_0123_abc"},
    "app_subscribe": {"type": "subscribe", "channel": "device:sensor-001", "id": "r1",
                      "since": 7, "epoch": "e1"},
    "app_group": {"type": "subscribe", "channel": "group:farm-a"},
    "app_presence": {"type": "subscribe", "channel": "presence:farm-a", "id": "r2"},
    "app_unsubscribe": {"type": "unsubscribe", "channel": "alerts", "id": "r3"},
    "app_command": {"type": "command", "id": "r4", "device": "sensor-001",
                    "payload": {"reboot": True}, "qos": 2, "ttlMs": 60000, "waitMs": 5000},
    "mqtt_subscribe": {"type": "subscribe", "topic": "groups/farm-a/+/temp", "id": "r1"},
    "mqtt_wildcard": {"type": "subscribe", "topic": "$share/g/devices/#"},
    "mqtt_unsubscribe": {"type": "unsubscribe", "topic": "groups/farm-a/+/temp", "id": "r3"},
    "mqtt_publish": {"type": "publish", "topic": "apps/user:alice/out", "payload": {"t": 1},
                     "qos": 1, "retain": True, "id": "r2"},
    "mqtt_publish_text": {"type": "publish", "topic": "a/b", "payload": "21.5"},
}

ADMIN = {
    "device": ("POST /v1/devices", {"id": "sensor-001", "groups": ["farm-a"],
                                    "transport": "mqtt"}),
    "device_groups": ("PATCH /v1/devices/{id}", {"groups": ["farm-a", "line:2"]}),
    "desired": ("PATCH /v1/devices/{id}/shadow/desired",
                {"state": {"mode": "boost", "fan": None, "limits": {"t": 80}}, "version": 3}),
    "command": ("POST /v1/devices/{id}/commands",
                {"payload": {"reboot": True}, "qos": 2, "ttlMs": 60000.0, "waitMs": 5000}),
    "user": ("POST /v1/users", {"username": "alice", "password": "correct horse battery",
                                "role": "operator", "groups": ["farm-a"]}),
    "user_update": ("PATCH /v1/users/{name}", {"password": "another long password",
                                               "role": "viewer", "groups": ["*"]}),
    "login": ("POST /v1/auth/login", {"username": "alice", "password": "pw"}),
    "key": ("POST /v1/api-keys", {"name": "ci", "role": "admin", "groups": ["farm-a"],
                                  "expiresAt": TS + 86_400_000}),
    "job": ("POST /v1/jobs", {"group": "farm-a", "devices": ["d1", "d2"],
                              "payload": {"fw": "1.2"}, "qos": 1, "ttlMs": 3600000,
                              "rate": 100, "abortFailedPercent": 10}),
    "scene": ("PUT /v1/scenes/{name}", {"actions": [
        {"group": "farm-a", "payload": {"lights": "off"}},
        {"devices": ["d1"], "payload": {"lock": True}, "qos": 2, "ttlMs": 1000}]}),
    "rule_threshold": ("PUT /v1/alert-rules/{id}", {
        "name": "Too hot", "target": {"group": "farm-a"}, "forMs": 30000,
        "severity": "critical",
        "condition": {"threshold": {"tag": "temperature", "op": ">", "value": 80,
                                    "clear": 75}}}),
    "rule_band": ("PUT /v1/alert-rules/{id}", {
        "id": "fuzz-1", "target": {"device": "sensor-001"},
        "condition": {"band": {"tag": "humidity", "low": 10, "high": 30.5, "margin": 1}}}),
    "rule_rate": ("PUT /v1/alert-rules/{id}", {
        "target": {"group": "g"}, "condition": {"rate": {"tag": "p", "perSecond": 5}}}),
    "rule_offline": ("PUT /v1/alert-rules/{id}", {
        "target": {"group": "g"}, "condition": {"offline": {"seconds": 60}}}),
}

# Protobuf: fleetgate.v1.Envelope field numbers and the Type enum (proto/fleetgate.proto).
PB_FIELDS = {"ver": 1, "msgid": 2, "timestamp": 3, "from": 4, "to": 5, "type": 6,
             "payload": 7, "qos": 8, "retain": 9, "dup": 10, "deviceId": 11, "token": 12,
             "status": 13, "reason": 14, "sessionId": 15, "heartbeatMs": 16,
             "nonce": 17, "sig": 18}
PB_TYPES = {"auth": 1, "auth_response": 2, "status": 3, "event": 4, "command": 5,
            "batch": 6, "ack": 7, "rec": 8, "rel": 9, "comp": 10, "error": 11, "delta": 12}


def varint(n):
    n &= (1 << 64) - 1  # negative int64 values are ten-byte two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_field(number, value):
    if isinstance(value, bool):
        return varint(number << 3) + varint(int(value))
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    data = value if isinstance(value, bytes) else value.encode()
    return varint(number << 3 | 2) + varint(len(data)) + data


def protobuf(frame):
    out = b""
    for key, value in frame.items():
        if key == "type":
            value = PB_TYPES[value]
        elif key == "payload":
            value = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        if key in PB_FIELDS:
            out += pb_field(PB_FIELDS[key], value)
    return out


def text(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def write(out, target, name, data):
    os.makedirs(os.path.join(out, target), exist_ok=True)
    with open(os.path.join(out, target, name), "wb") as f:
        f.write(data)


def main():
    out = sys.argv[1]
    for name, frame in DEVICE.items():
        write(out, "json_frame", name, text(frame))
        if not name.startswith("compact"):
            write(out, "proto_frame", name, protobuf(frame))
    for name, value in BATCH_ITEMS.items():
        write(out, "batch_items", name, text(value))
    for name, frame in CLIENT.items():
        write(out, "client_frame", name, text(frame))
    write(out, "client_frame", "broker_binary", b"\xff\x00\x01")
    for name, (route, body) in ADMIN.items():
        write(out, "admin_body", name, route.encode() + b"\n" + text(body))


if __name__ == "__main__":
    main()
