"""The yardstick: a bare Starlette route returning a 302, no storage.

One uvicorn worker with uvloop + httptools and the access log off, as tinytrack
runs. `python bench/yardstick.py --port 8001`
"""

import argparse

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.routing import Route

URL = "https://offer.example.com/lp?cid=00000000-0000-7000-8000-000000000000&s1=abc"


async def click(request: Request) -> RedirectResponse:
    return RedirectResponse(URL, status_code=302)


app = Starlette(routes=[Route("/c/{name}", click)])

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="off",
    )
