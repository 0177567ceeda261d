"""backbone-arena's harness: data, tasks, run records, efficiency and leaderboards."""
__version__ = "0.1.0"
