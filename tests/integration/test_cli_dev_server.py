"""``beanie-tasks dev-server``: prints a URI that works, and stops its server on SIGTERM."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys

from beanie_tasks.driver import client_for, close_client


async def test_dev_server_serves_until_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "beanie_tasks.cli", "dev-server", "--database", "devdb",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        uri = None
        while uri is None:
            line = (await asyncio.wait_for(process.stdout.readline(), timeout=60)).decode()
            assert line, "dev-server exited before printing its URI"
            if match := re.search(r"export MONGODB_URI='([^']+)'", line):
                uri = match[1]
        assert uri.startswith("mongodb://127.0.0.1:") and "/devdb?" in uri
        client = client_for(uri, serverSelectionTimeoutMS=10_000)
        assert (await client.admin.command("ping"))["ok"] == 1
        await close_client(client)
        port = int(uri.split(":")[2].split("/")[0])

        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the embedded server outlived dev-server"
