"""A real OPC UA server (asyncua) holding the variables an integrator would create for edge-ad.

    python tests/opcua_server.py --port P [--prefix edge-ad.] [--namespace urn:edge-ad] [--user U --password W]

Run as its own process so that a test can SIGKILL it and start it again on the same port (a restart loses
every value, as a real PLC restart does). Prints `ready` once it listens. `frames_anomalous` is left out
on purpose (the sink must skip a variable the server lacks); integer variables use different types (the
sink must write each with the variable's own type).
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import datetime, timezone

from asyncua import Server, ua
from asyncua.server.user_managers import User, UserManager, UserRole

VARIABLES = {
    "state": ("", ua.VariantType.String),
    "score": (0.0, ua.VariantType.Double),
    "part_id": ("", ua.VariantType.String),
    "event_id": ("", ua.VariantType.String),
    "timestamp": (datetime(2000, 1, 1, tzinfo=timezone.utc), ua.VariantType.DateTime),
    "alerts": (0, ua.VariantType.Int32),
    "clears": (0, ua.VariantType.UInt32),
    "parts_ok": (0, ua.VariantType.Int64),
    "parts_nok": (0, ua.VariantType.Int64),
    "parts_error": (0, ua.VariantType.UInt16),
    "frames_processed": (0, ua.VariantType.UInt64),
    "status": ("", ua.VariantType.String),
}


class _OneUser(UserManager):
    def __init__(self, username: str, password: str):
        self.username, self.password = username, password

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username == self.username and password == self.password:
            return User(role=UserRole.User)
        return None


async def main(args: argparse.Namespace) -> None:
    server = Server(user_manager=_OneUser(args.user, args.password) if args.user else None)
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{args.port}/edge-ad/")
    if args.user:
        server.set_security_IDs(["Username"])
    index = await server.register_namespace(args.namespace)
    folder = await server.nodes.objects.add_folder(ua.NodeId(f"{args.prefix}folder", index), "edge-ad")
    variables = dict(VARIABLES)
    if args.score_as_text:  # an integrator's mistake: the sink must still write every other variable
        variables["score"] = ("", ua.VariantType.String)
    for name, (initial, vtype) in variables.items():
        node = await folder.add_variable(ua.NodeId(f"{args.prefix}{name}", index), name, ua.Variant(initial, vtype))
        await node.set_writable()
    async with server:
        print("ready", flush=True)
        while True:
            await asyncio.sleep(3600)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--namespace", default="urn:edge-ad")
    parser.add_argument("--prefix", default="edge-ad.")
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--score-as-text", action="store_true", help="declare `score` a String variable")
    asyncio.run(main(parser.parse_args()))
