"""Placement (mesh402.placement, pure): capacity, host election, pipeline and expert plans, plan epochs."""
