"""Container runtimes behind one interface (Docker first)."""

from gateway.services.runtime.base import (
    ContainerInfo,
    ContainerRuntime,
    ContainerSpec,
    ContainerState,
    VolumeMount,
)

__all__ = ["ContainerInfo", "ContainerRuntime", "ContainerSpec", "ContainerState", "VolumeMount"]
