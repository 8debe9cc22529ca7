"""Releases: a self-contained folder a trained system can be taken away in (`abair export`).

bundle: the release folder (its layout, config.json, writing one from a registry version or a
components folder, reading one back); facts: what the source records about the system; card:
MODEL_CARD.md, written from those facts alone.
"""
