"""The running node (mesh402.node): one node per home, start-up that fails cleanly, automatic epoch payouts."""
