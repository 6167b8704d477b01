"""moshi-grpc: production gRPC serving for Moshi (Mimi codec + Moshi LM).

The public Python API lives here; heavy imports (torch, grpc) happen on first use so that
`import moshi_grpc` stays cheap for CLI start-up.
"""

from __future__ import annotations

__version__ = "0.1.0"
