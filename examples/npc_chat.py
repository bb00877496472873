"""Talk to an NPC of a running `steer serve --npcs DIR` from the terminal.

    python examples/npc_chat.py --npc brom --seed 7 --player Ana
    python examples/npc_chat.py --resume SESSION_ID      # carry on where a session left off

While chatting: `/mood humor=3 helpfulness=4` steers the next lines (clamped to the NPC's bounds),
`/save FILE` writes the session as JSON (a save game), `/load FILE` restores one, `/quit` leaves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from steer.client import NpcLine, SteerAPIError, SteerClient


def parse_mood(items: list[str]) -> dict[str, int]:
    mood = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"{item!r}: write attribute=value, e.g. humor=3")
        mood[name.strip()] = int(value)
    return mood


def player_lines():
    """Lines typed at a prompt, or piped in (for scripted runs)."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield input("you> ")
        except EOFError:
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--npc", help="NPC id (omitted: list the server's NPCs)")
    parser.add_argument("--seed", type=int, default=None, help="replay the same lines for the same player lines")
    parser.add_argument("--player", default=None, help="the player's name, known to the NPC")
    parser.add_argument("--resume", default=None, help="continue an existing session by id")
    parser.add_argument("--mood", nargs="*", default=[], help="attribute=value overrides, e.g. humor=3")
    args = parser.parse_args(argv)

    with SteerClient(args.server, api_key=args.api_key) as steer:
        try:
            if args.resume:
                session = steer.session(args.resume)
                for m in steer.history(session.id).messages:
                    print(f"{'you' if m.role == 'user' else session.npc_id}> {m.content}")
            elif args.npc:
                session = steer.create_session(args.npc, seed=args.seed, player_name=args.player)
            else:
                for npc in steer.npcs():
                    print(f"{npc.id:20} {npc.name}, {npc.role}")
                return 0
            npc = steer.npc(session.npc_id)
            mood = parse_mood(args.mood)
        except (SteerAPIError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"Talking to {npc.name} (session {session.id}). /quit to leave.")
        for raw in player_lines():
            line = raw.strip()
            if not line:
                continue
            command, _, rest = line.partition(" ")
            try:
                if command == "/quit":
                    break
                if command == "/mood":
                    mood = parse_mood(rest.split())
                    continue
                if command == "/save":
                    Path(rest).write_text(json.dumps(steer.export_session(session.id), indent=2))
                    print(f"saved to {rest}")
                    continue
                if command == "/load":
                    session = steer.import_session(json.loads(Path(rest).read_text()))
                    print(f"loaded into session {session.id}")
                    continue
                print(f"{npc.name}> ", end="", flush=True)
                for item in steer.say_stream(session.id, line, attributes=mood or None):
                    if isinstance(item, NpcLine):
                        notes = [f"{c['attribute']} clamped to {c['applied']}" for c in item.clamped or []]
                        if item.fell_back:
                            notes.append("too toxic: fallback line")
                        print(f"  [{'; '.join(notes)}]" if notes else "")
                    else:
                        print(item, end="", flush=True)
            except (SteerAPIError, ValueError, OSError) as e:
                print(f"\nerror: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
