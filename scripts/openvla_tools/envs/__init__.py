"""Simulated environments for demonstrations and closed-loop evaluation: the built-in 2-D tabletop (`tabletop`) and
Meta-World (`metaworld_env`, an optional extra)."""
