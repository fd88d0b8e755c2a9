"""Finding a mesh (mesh402.discovery): listings, Nostr relays, LAN mDNS, the ERC-8004 registry."""
