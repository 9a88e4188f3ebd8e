"""From a community's posts and engagement events to training pairs: the rule as one query (rule.py), DuckDB and
Spark running it (engines.py), the machine's limits (machine.py), the whole command's work (pairs.py).
"""
