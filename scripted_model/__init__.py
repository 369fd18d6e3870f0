"""The scripted Messages API: a deterministic model server for the real Claude Code CLI.

Its own package, outside the gateway: the gateway never imports it. It serves offline demos
(``ccgate scripted-model``, scripts/quickstart.sh), every test and the benchmarks.
"""

from scripted_model.server import BRACES_TEXT, ScriptedModelServer, script_reply, serve

__all__ = ["BRACES_TEXT", "ScriptedModelServer", "script_reply", "serve"]
