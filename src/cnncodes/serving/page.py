"""GET /: a page for people, to drop images on the served model and see its answers and heat maps.

The page (`page.html` beside this module) is one self-contained file: its style and script
are inline and it loads nothing from elsewhere, since clusters are often cut off from the
internet. It calls /metadata, /predict and /explain of the same server, with the API key its
user types (kept in the tab's sessionStorage). Its Content-Security-Policy allows only its
own inline style and script (by their hashes), so nothing injected into it could run.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE_FILE = "page.html"


def page_headers(page: str) -> dict[str, str]:
    """The security headers of `page`: a policy allowing its own inline `<style>` and `<script>`, nothing else.

    Args:
        page: the HTML, whose inline style and script blocks are hashed into the policy.

    Returns:
        The response headers.
    """
    hashes = {
        tag: " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()}'"
            for block in re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
        )
        for tag in ("style", "script")
    }
    policy = (
        f"default-src 'none'; style-src {hashes['style']}; script-src {hashes['script']}; img-src blob: data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def add_page_route(app: FastAPI, *, model: str) -> None:
    """GET /: the page, naming `model`.

    Args:
        app: the service.
        model: the served model's name, shown in the page's title.
    """
    page = (files("cnncodes.serving") / PAGE_FILE).read_text(encoding="utf-8").replace("{{model}}", html.escape(model))
    headers = page_headers(page)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)
