"""ccgate's gateway: HTTP and WebSocket API, session lifecycle, ledger and model proxy."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ccgate")
except PackageNotFoundError:  # run from a source tree without an install
    __version__ = "0.0.0+unknown"
