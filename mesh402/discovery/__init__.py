"""Finding meshes: Nostr listings (nostr.py), LAN mDNS (lan.py) and the `--auto` choice (auto.py).

Pure parts (the listing format, mesh ids, scoring, merge order) live in listing.py and are
tested without sockets.
"""
