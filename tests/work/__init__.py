"""What a stage signs (mesh402.work): receipts, work units and the epoch payouts they drive."""
