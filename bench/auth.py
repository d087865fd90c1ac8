"""How fast can a prime service verify signed requests? Prints figures; asserts nothing.

    python bench/auth.py [--seconds 2]

1. recover_signer (coincurve directly) vs eth-account's generic recover_message
2. sign_headers (what each client pays per request)
3. ReplayCache.remember with a full window of live nonces
4. end to end: signed POSTs through aiohttp on loopback (server + client in one process,
   so this is a floor for what the middleware allows, not the middleware's own cost)
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from eth_account import Account
from eth_account.messages import encode_defunct

from prime.auth.middleware import signed_request_middleware
from prime.auth.replay import ReplayCache
from prime.auth.signing import (
    HEADER_SIGNATURE,
    Domain,
    canonical_message,
    recover_signer,
    sign_answer,
    sign_headers,
    verify_answer,
)
from prime.web import bound_port, make_app, serve

SERVER = Account.create()  # the service the signed requests are addressed to
DOMAIN = Domain(31337, "0x" + "ab" * 20)


def rate(label: str, fn, seconds: float) -> float:  # type: ignore[no-untyped-def]
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(100):
            fn()
        n += 100
    per_s = n / (time.perf_counter() - start)
    print(f"{label:<55} {per_s:>10,.0f} /s   ({1e6 / per_s:,.1f} µs each)")
    return per_s


async def end_to_end(seconds: float, concurrency: int = 32) -> None:
    app = make_app(name="bench", middlewares=[signed_request_middleware(SERVER, DOMAIN)])

    async def heartbeat(request: web.Request) -> web.Response:
        return web.json_response({"interval": 30})

    app.router.add_post("/heartbeat", heartbeat)
    runner = await serve(app, host="127.0.0.1", port=0)
    url = f"http://127.0.0.1:{bound_port(runner)}/heartbeat"
    accounts = [Account.create() for _ in range(concurrency)]
    body = b'{"tasks":[],"gpus":[{"util":0.9,"mem_used":1000,"temp":60}],"load":1.0}'
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession, account) -> None:  # type: ignore[no-untyped-def]
        nonlocal done
        while time.perf_counter() < deadline:
            headers = sign_headers(account, "POST", "/heartbeat", body, audience=SERVER.address, domain=DOMAIN)
            async with session.post(url, data=body, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
            done += 1

    start = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session, a) for a in accounts))
    elapsed = time.perf_counter() - start
    await runner.cleanup()
    print(f"{'signed POST /heartbeat over loopback (sign+send+verify)':<55} {done / elapsed:>10,.0f} /s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0)
    seconds = parser.parse_args().seconds

    account = Account.create()
    body = b'{"tasks":[],"gpus":[],"load":0.5}'
    headers = sign_headers(account, "POST", "/heartbeat", body, audience=SERVER.address, domain=DOMAIN)
    assert recover_signer(headers, "POST", "/heartbeat", body, audience=SERVER.address, domain=DOMAIN) == account.address
    text = canonical_message("POST", "/heartbeat", int(headers["X-Prime-Timestamp"]), headers["X-Prime-Nonce"], body,
                             audience=SERVER.address, domain=DOMAIN)
    signable = encode_defunct(text=text)
    signature = headers[HEADER_SIGNATURE]

    ours = rate("recover_signer (prime.auth.signing, coincurve)", lambda: recover_signer(headers, "POST", "/heartbeat", body, audience=SERVER.address, domain=DOMAIN), seconds)
    base = rate("Account.recover_message (eth-account, baseline)", lambda: Account.recover_message(signable, signature=signature), seconds)
    print(f"{'speed-up over eth-account':<55} {ours / base:>10.1f} x")
    rate("sign_headers (client side)", lambda: sign_headers(account, "POST", "/heartbeat", body, audience=SERVER.address, domain=DOMAIN), seconds)

    cache = ReplayCache(60, max_entries=2_000_000)
    now = int(time.time())
    counter = iter(range(10**9))
    for i in range(200_000):  # a window's worth of live nonces already stored
        cache.remember(account.address, f"warm-nonce-{i:08d}", now)
    memory = rate("ReplayCache.remember (200k live nonces)", lambda: cache.remember(account.address, f"bench-nonce-{next(counter):010d}", now), seconds)
    with tempfile.TemporaryDirectory(prefix="prime-bench-nonces-") as tmp:
        kept = ReplayCache.persistent(Path(tmp), 60, max_entries=2_000_000)
        disk = rate("ReplayCache.persistent remember (journal on disk)",
                    lambda: kept.remember(account.address, f"bench-nonce-{next(counter):010d}", now), seconds)
        kept.close()
        started = time.perf_counter()
        reloaded = ReplayCache.persistent(Path(tmp), 60, max_entries=2_000_000)
        print(f"{'  reload of ' + format(len(reloaded), ',') + ' live nonces after a restart':<55} {time.perf_counter() - started:>10.3f} s")
    print(f"{'  journal cost vs memory only':<55} {memory / disk:>10.1f} x")
    answer = b'{"interval_s":30.0,"desired":[]}'
    rate("sign_answer (server side, per answer)", lambda: sign_answer(account, "n" * 24, 200, answer, DOMAIN), seconds)
    signed = sign_answer(account, "n" * 24, 200, answer, DOMAIN)
    rate("verify_answer (client side, per answer)",
         lambda: verify_answer(signed, "n" * 24, 200, answer, expected=account.address, domain=DOMAIN), seconds)

    asyncio.run(end_to_end(seconds))


if __name__ == "__main__":
    main()
