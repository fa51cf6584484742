"""adapt-bench: the harness (registries, Method protocol, presets, runner, results store, scoring, leaderboard).

Importing ``bench`` loads no plugin and changes no global state.
"""

__version__ = "0.1.0"
