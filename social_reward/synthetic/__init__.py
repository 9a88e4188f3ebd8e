"""The demo's world, not the library's core: a synthetic community of shapes whose hidden quality is known, a
synthetic generator, and tiny pipelines of every family with random weights (for the demos and the tests).
"""
