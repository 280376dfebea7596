"""The web dashboard mounted in an app of your own, behind an auth hook, with a redaction hook."""

import asyncio
import re
from typing import Any

import httpx
from beanie import init_beanie
from pymongo import AsyncMongoClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from beanie_tasks import Task
from beanie_tasks.embedded import server_uri
from beanie_tasks.web import dashboard


class Invoice(Task):
    customer: str
    card_number: str = ""

    @classmethod
    def dashboard_redact(cls, document: dict[str, Any]) -> dict[str, Any]:
        """What the dashboard may show: the last four digits only."""
        card = str(document.get("card_number", ""))
        return document | {"card_number": f"**** {card[-4:]}" if card else ""}


def operators_only(request: Request) -> bool:
    """The auth hook: your app decides (a session, a header set by your proxy, ...)."""
    return request.headers.get("x-role") == "ops"


async def home(request: Request) -> PlainTextResponse:
    return PlainTextResponse("my app")


app = Starlette(
    routes=[
        Route("/", home),
        Mount("/tasks", dashboard([Invoice], auth=operators_only, title="billing queues")),
    ]
)


async def main(uri: str) -> None:
    client = AsyncMongoClient(uri, tz_aware=True)
    await client.drop_database("example_dashboard")
    await init_beanie(database=client.example_dashboard, document_models=[Invoice])
    invoice = await Invoice(customer="ACME <script>", card_number="4111111111111111").push()

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        assert (await http.get("/tasks/")).status_code == 403  # the auth hook refused
        ops = {"x-role": "ops"}
        overview = await http.get("/tasks/", headers=ops)
        print("overview", overview.status_code)
        detail = await http.get(f"/tasks/tasks/Invoice/{invoice.id}", headers=ops)
        assert "**** 1111" in detail.text and "4111111111111111" not in detail.text
        assert "ACME &lt;script&gt;" in detail.text  # stored values are escaped
        token = re.search(r'name="csrf" value="([^"]+)"', detail.text)
        assert token is not None
        cancelled = await http.post(
            f"/tasks/tasks/Invoice/{invoice.id}/cancel",
            data={"csrf": token.group(1)},
            headers=ops | {"HX-Request": "1"},
        )
        print("cancel", cancelled.status_code, cancelled.text)
    assert (await Invoice.get(invoice.id)).state == "CANCELLED"  # type: ignore[union-attr]
    await client.drop_database("example_dashboard")
    await client.close()


if __name__ == "__main__":
    with server_uri() as uri:
        asyncio.run(main(uri))
