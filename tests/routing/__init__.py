"""Routing (mesh402.routing, pure): classification, model scoring, affinity and stickiness."""
