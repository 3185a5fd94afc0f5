"""TLS on fleetgate's listeners, checked with Python's ssl module and websockets (clients we
did not write).

    tls.py GATEWAY_HOST:PORT ADMIN_HOST:PORT CA_PEM API_KEY [DEVICE_ID CERT_PEM KEY_PEM]

Old protocol versions and weak suites are offered with the client's own floor lowered
(SECLEVEL=0), so a refusal is the server's. With a device certificate, the device connects
over wss:// with it (mTLS) and must be authenticated by it, with no token.
"""

import asyncio
import json
import socket
import time
import ssl
import sys
import urllib.request
import warnings

import websockets

warnings.filterwarnings("ignore", category=DeprecationWarning)


def split(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def context(ca, cert=None, key=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def handshake(addr, ctx):
    """The negotiated (version, cipher, alpn), or the error text when refused."""
    host, port = split(addr)
    with socket.create_connection((host, port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                return tls.version(), tls.cipher()[0], tls.selected_alpn_protocol()
        except (ssl.SSLError, ConnectionResetError) as e:
            return f"refused: {e}"


def step(name, ok, detail):
    if not ok:
        print(f"FAILED {name}: {detail}")
        sys.exit(1)
    print(f"ok {name}: {detail}")


def check_listener(addr, ca, cert=None, key=None):
    old = context(ca, cert, key)
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT@SECLEVEL=0")
    got = handshake(addr, old)
    step(f"{addr} refuses TLS 1.0/1.1", isinstance(got, str), got)

    weak = context(ca, cert, key)
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    # CBC suites, RSA key exchange, 3DES: none is in a modern server's list.
    weak.set_ciphers("AES128-SHA:AES256-SHA:ECDHE-ECDSA-AES128-SHA:DES-CBC3-SHA:@SECLEVEL=0")
    got = handshake(addr, weak)
    step(f"{addr} refuses weak TLS 1.2 suites", isinstance(got, str), got)

    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = context(ca, cert, key)
        ctx.minimum_version = version
        ctx.maximum_version = version
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        got = handshake(addr, ctx)
        step(
            f"{addr} speaks {version.name}",
            not isinstance(got, str)
            and got[2] == "http/1.1"
            and ("GCM" in got[1] or "CHACHA20" in got[1]),
            got,
        )


async def device_over_mtls(gateway, ca, device, cert, key):
    ctx = context(ca, cert, key)
    url = f"wss://localhost:{split(gateway)[1]}/v1/device"
    async with websockets.connect(
        url, ssl=ctx, additional_headers={"Device-ID": device}, open_timeout=5
    ) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 5))
        step("device authenticated by its certificate", first.get("status") == "success", first)
        await ws.send(
            json.dumps(
                {"ver": "1.0", "msgid": "py-tls-1", "timestamp": int(time.time() * 1000),
                 "from": device, "to": "server", "type": "status", "payload": {"t": 1}, "qos": 1}
            )
        )
        ack = json.loads(await asyncio.wait_for(ws.recv(), 5))
        step("status acked over wss", ack == {"type": "ack", "msgid": "py-tls-1"}, ack)


def admin_over_https(admin, ca, api_key):
    url = f"https://localhost:{split(admin)[1]}/v1/devices"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(req, context=context(ca), timeout=5) as resp:
        body = json.loads(resp.read())
        step("admin API over https", resp.status == 200 and "devices" in body, resp.status)


def main():
    gateway, admin, ca, api_key = sys.argv[1:5]
    client = sys.argv[5:8]
    cert = key = None
    if client:
        device, cert, key = client
    check_listener(gateway, ca, cert, key)
    check_listener(admin, ca)
    admin_over_https(admin, ca, api_key)
    if client:
        asyncio.run(device_over_mtls(gateway, ca, device, cert, key))
    print("interop: all steps passed")


if __name__ == "__main__":
    main()
